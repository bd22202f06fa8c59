"""Capture and replay the random-number state, so recomputed steps draw the same numbers.

Like ``torch.utils.checkpoint``: the CPU generator always, and the CUDA generator of every device
the scan's tensors live on. States are kept in plain Python objects (not ``save_for_backward``,
which fails under ``torch.func.grad`` for generator states).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["RngState", "cuda_devices", "preserve_rng"]


def cuda_devices(tensors: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """CUDA device indices used by ``tensors`` (vmap/grad wrappers see through to the device)."""
    return tuple(sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"}))


@dataclass(frozen=True)
class RngState:
    """The CPU generator state and the CUDA ones of ``devices``."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]
    devices: tuple[int, ...]

    @classmethod
    def capture(cls, devices: tuple[int, ...]) -> RngState:
        cuda = tuple(torch.cuda.get_rng_state(d) for d in devices)
        return cls(torch.get_rng_state(), cuda, devices)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def preserve_rng(devices: tuple[int, ...]) -> Iterator[None]:
    """Run the block and put the generators back as they were (the backward pass replays)."""
    saved = RngState.capture(devices)
    try:
        yield
    finally:
        saved.restore()
