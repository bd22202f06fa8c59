"""Steps of ``fmaml train`` under ``torchrun``: on every rank, or on rank 0 for all of them.

An error is a :class:`fmaml.app.errors.CLIError` on every rank, so each rank exits with the same
status and rank 0 prints it once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fmaml import distributed
from fmaml.app.errors import CLIError

__all__ = ["every_rank", "on_main"]


def every_rank(ctx: distributed.Context, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it raises :class:`CLIError` on any, the same error on all."""
    try:
        value, error = fn(), None
    except CLIError as e:
        value, error = None, e
    if ctx.world_size == 1:
        if error is not None:
            raise error
        return value
    errors: list[Any] = [None] * ctx.world_size
    mine = None if error is None else (str(error), error.status)
    torch.distributed.all_gather_object(errors, mine)
    bad = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if bad:
        messages = {m for _, (m, _) in bad}
        if len(messages) == 1 and len(bad) == ctx.world_size:
            text = bad[0][1][0]
        else:
            text = "; ".join(f"rank {rank}: {m}" for rank, (m, _) in bad)
        raise CLIError(text, bad[0][1][1])
    return value


def on_main(ctx: distributed.Context, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; every rank gets its result, or raises its :class:`CLIError`."""
    if ctx.world_size == 1:
        return fn()
    box: list[Any] = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", fn())
        except CLIError as e:
            box[0] = ("error", str(e), e.status)
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise CLIError(box[0][1], box[0][2])
    return box[0][1]
