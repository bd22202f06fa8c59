"""The functional MAML layer: ``inner_step``, ``adapt``, ``unrolled_loss`` and ``meta_grad``.

MAML (Finn et al., 2017) minimises over initial parameters ``θ`` the mean over tasks of the query
loss after ``k`` inner gradient steps on the support set::

    θ_0 = θ,   θ_{i+1} = θ_i - α ∇L_support(θ_i),   meta-loss = mean_t L_query^t(θ_k^t)

The inner loop is one :func:`fmaml.scan` per task (carry: the parameters; constants: the support
batch), so its gradient is exact and its memory follows the checkpoint policy, not ``k``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch
from torch import nn
from torch.func import vmap

from fmaml import optim
from fmaml._accumulate import accumulate, accumulate_with_grad
from fmaml._autodiff import _is_floating, _records, grad_and_value_any, transforms_active
from fmaml._batching import Batching, TaskFootprint, choose, default_budget
from fmaml._compile import Compile, resolve_compile
from fmaml._footprint import SavedBytes, plain_autograd, sample
from fmaml._functional import (
    BufferReader,
    batch_norm_in_plain_ops,
    check_trackable,
    check_tracked,
    collect_running_stats,
    inner_buffers,
    module_running_stats,
    running_stats,
    update_running_stats,
)
from fmaml._module_call import ModuleCall
from fmaml._policy import Auto, Policy, StoreAll, _check_bytes, resolve_policy
from fmaml._rng import cuda_devices, preserve_rng
from fmaml._scan import _nbytes, _tracked, record_batching, scan
from fmaml._tree import describe_leaf, detached, flatten, leaf_paths, tree_map, unflatten
from fmaml._typing import Batch, ForwardFn, LossFn, MetaAux, MetricsFn, Params, Tasks
from fmaml.optim import GradientTransformation

__all__ = ["MAML", "reptile_direction"]

_BATCHING = ("auto", "vmap", "loop")
_RANDOMNESS = ("error", "different", "same")
_BN_STATS = ("batch", "carry", "track")


class MAML:
    """Exact, memory-frugal MAML over a ``torch.nn.Module`` as pure functions of its parameters.

    Args:
        model: the network. Its parameters are *not* used: every method takes ``params``
            explicitly (``fmaml.params(model)``, or ``dict(model.named_parameters())`` for
            ``loss.backward()``). Buffers are inputs: BatchNorm uses batch statistics and its
            running buffers are never updated (see ``fmaml._functional``).
        loss_fn: ``loss_fn(model(x), y) -> scalar`` for batches ``(x, y)``.
        forward: instead of ``loss_fn``, ``forward(params, batch) -> scalar`` for any batch;
            call ``torch.func.functional_call(model, params, ...)`` inside it.
        metrics: ``metrics(output, target) -> {name: tensor}``, computed on each task's query
            predictions and targets in the forward pass that computes the meta-loss (no second
            pass), e.g. ``lambda out, y: {"accuracy": (out.argmax(-1) == y).float().mean()}``;
            returned by ``unrolled_loss(..., has_aux=True)`` and ``meta_grad(..., has_aux=True)``
            in ``aux.metrics``, one value per task (detached). Needs ``loss_fn``.
        inner_lr: the inner SGD step size ``α`` (> 0); default 0.4 when ``inner_opt`` is None.
        inner_opt: an inner optimizer from :mod:`fmaml.optim` (``adam``, ``momentum``,
            ``rmsprop``, ``meta_sgd``, ``chain(clip_by_global_norm(1.0), sgd(0.1))``, ...). Its
            state rides in the scan's carry, so recomputation replays it exactly. Learned rates
            (``meta_sgd``, ``scalar_lr``, ``per_layer_lr``) take ``hyper`` in every method.
        adapt_only: ANIL/BOIL style: the names (or module prefixes, e.g. ``"head"``) of the
            parameters the inner loop adapts. The others stay fixed inside the inner loop but
            still receive their exact meta-gradient; the carry holds only the adapted subset.
        checkpoint: the inner loop's checkpoint policy (see :func:`fmaml.scan`).
        first_order: first-order MAML: the inner gradients are constants, so the meta-gradient
            is the query gradient at the adapted parameters; the inner loop then runs without
            any graph at all (with learned rates, with a graph of the rates only: they get their
            first-order gradient, ``-Σ_i g_i ⊙ ∇L_query`` for Meta-SGD).
        bn_stats: ``"batch"`` (default): BatchNorm normalises with batch statistics and nothing
            is carried. ``"carry"``: each task carries its own BatchNorm running statistics
            through the inner loop, starting from the module's buffers and updated after every
            inner step by PyTorch's momentum rule (not differentiated) while the module is in
            train mode; in eval mode (``model.eval()``) BatchNorm normalises with the task's
            carried statistics and leaves them as they are, as ``torch.nn.BatchNorm`` does.
            :meth:`adapt` returns them beside the parameters, by buffer name.
            The module's own buffers are never touched.
            ``"track"``: as ``"batch"`` in train mode, and each meta-step (a call of
            :meth:`unrolled_loss` or :meth:`meta_grad` with the module in train mode) updates the
            module's running statistics once, by PyTorch's momentum rule, with the mean over tasks
            of the query passes' batch statistics (at the adapted parameters; the scan's
            recomputations never count). In eval mode the query-side passes (the query loss,
            :meth:`predict`, :meth:`loss`) normalise with those running statistics, while the
            inner loop keeps batch statistics, as in meta-training; so ``model.eval()`` after
            meta-training predicts each query example on its own.
        max_grad_grad_norm: clip the global norm of the meta-gradient flowing backward into each
            inner step to this value (torch_maml's option of the same name), for very long
            unrolls whose gradients explode. Intentionally inexact when it clips.
        batching: ``"auto"`` (default) measures one task once per shape and runs the tasks in
            a loop on the CPU when their operations are large (a conv net on tens of images),
            else in one ``vmap`` or in chunks of ``vmap`` that fit ``memory_budget`` (see
            ``fmaml._batching``; ``fmaml.record_scan()`` reports the choice). ``"vmap"``
            vectorises over tasks, ``task_chunk`` at a time (all when ``None``); ``"loop"`` runs
            one task at a time. The results are the same up to float rounding.
        task_chunk: how many tasks to vectorise at once (implies ``batching="vmap"`` when
            ``batching`` is ``"auto"``).
        memory_budget: bytes of graphs and snapshots a chunk of tasks may hold for
            ``batching="auto"`` (default: 1 GiB on the CPU, half the free memory of a GPU).
        randomness: ``torch.func.vmap``'s ``randomness`` for random ops (dropout) across tasks.
        check_finite: raise ``FloatingPointError`` naming the first task and inner step whose
            loss is NaN or inf (a few reductions; off by default, then free).
        compile: ``torch.compile`` a chunk of tasks whole (task batching, inner steps and
            query losses in one graph) where its inner loops keep their graphs, else the inner
            loop's steps and pull-backs (see :func:`fmaml.scan`): ``True``, ``"auto"`` (where
            measured to win: operators of at most 2**18 FLOPs on the CPU, i.e. small models),
            or ``torch.compile`` options as a dict or :class:`fmaml.Compile`. Off by default.
            Same results to round-off; ``docs/compile.md``.

    Example:
        >>> maml = fmaml.MAML(model, F.cross_entropy, inner_lr=0.4)  # doctest: +SKIP
        >>> params = fmaml.params(model)  # doctest: +SKIP
        >>> meta_grads = torch.func.grad(maml.unrolled_loss)(params, tasks, 5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        *,
        forward: ForwardFn | None = None,
        metrics: MetricsFn | None = None,
        inner_lr: float | None = None,
        inner_opt: GradientTransformation | None = None,
        adapt_only: Sequence[str] | None = None,
        checkpoint: str | Policy = "auto",
        first_order: bool = False,
        max_grad_grad_norm: float | None = None,
        bn_stats: str = "batch",
        batching: str = "auto",
        task_chunk: int | None = None,
        memory_budget: float | None = None,
        randomness: str = "different",
        check_finite: bool = False,
        compile: bool | str | dict | Compile = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAML: `model` must be a torch.nn.Module, got {type(model).__name__}.")
        if (loss_fn is None) == (forward is None):
            raise TypeError(
                "MAML: pass exactly one of `loss_fn` (loss_fn(model(x), y) for batches (x, y)) "
                "and `forward` (forward(params, batch) -> scalar loss)."
            )
        for name, fn, use in (
            ("loss_fn", loss_fn, "loss_fn(model(x), y) -> scalar, e.g. F.cross_entropy"),
            ("forward", forward, "forward(params, batch) -> scalar loss"),
            ("metrics", metrics, "metrics(output, target) -> {name: tensor}"),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(
                    f"MAML: `{name}` must be a function, {use}; got {describe_leaf(fn)}. Pass "
                    "the function itself (torch.nn.functional.mse_loss, not 'mse')."
                )
        if metrics is not None and forward is not None:
            raise ValueError(
                "MAML: `metrics` needs `loss_fn` (fmaml then runs the module and sees its "
                "outputs); with a custom `forward`, compute metrics inside it."
            )
        if inner_lr is not None and inner_opt is not None:
            raise TypeError(
                "MAML: pass `inner_lr` (plain SGD) or `inner_opt` (e.g. fmaml.optim.adam(1e-3)), "
                "not both."
            )
        if inner_opt is None:
            inner_lr = 0.4 if inner_lr is None else inner_lr
            if isinstance(inner_lr, bool) or not isinstance(inner_lr, int | float):
                raise TypeError(f"MAML: `inner_lr` must be a positive number, got {inner_lr!r}.")
            if not (math.isfinite(inner_lr) and inner_lr > 0):
                raise ValueError(f"MAML: `inner_lr` must be positive and finite, got {inner_lr!r}.")
            inner_opt = optim.sgd(float(inner_lr))
        elif not isinstance(inner_opt, GradientTransformation):
            raise TypeError(
                "MAML: `inner_opt` must be a fmaml.optim.GradientTransformation (an (init, update) "
                f"pair such as fmaml.optim.adam(1e-3)), got {type(inner_opt).__name__}."
            )
        if max_grad_grad_norm is not None and (
            isinstance(max_grad_grad_norm, bool)
            or not isinstance(max_grad_grad_norm, int | float)
            or not (math.isfinite(max_grad_grad_norm) and max_grad_grad_norm > 0)
        ):
            raise ValueError(
                "MAML: `max_grad_grad_norm` must be a positive number or None, got "
                f"{max_grad_grad_norm!r}."
            )
        if batching not in _BATCHING:
            raise ValueError(f"MAML: `batching` must be one of {_BATCHING}, got {batching!r}.")
        if task_chunk is not None and (
            isinstance(task_chunk, bool) or not isinstance(task_chunk, int) or task_chunk < 1
        ):
            raise ValueError(f"MAML: `task_chunk` must be an int >= 1 or None, got {task_chunk!r}.")
        if task_chunk is not None and batching == "auto":
            batching = "vmap"
        _check_bytes("MAML", "memory_budget", memory_budget)
        if randomness not in _RANDOMNESS:
            raise ValueError(
                f"MAML: `randomness` must be one of {_RANDOMNESS}, got {randomness!r}."
            )
        self.model = model
        self.loss_fn = loss_fn
        self.forward = forward
        self.metrics = metrics
        self.inner_lr = None if inner_lr is None else float(inner_lr)
        self.inner_opt = inner_opt
        self.max_grad_grad_norm = max_grad_grad_norm
        if bn_stats not in _BN_STATS:
            raise ValueError(f"MAML: `bn_stats` must be one of {_BN_STATS}, got {bn_stats!r}.")
        if bn_stats != "batch" and forward is not None:
            raise ValueError(
                f"MAML: bn_stats={bn_stats!r} needs `loss_fn` (fmaml runs the module); with a "
                "custom `forward`, handle the statistics yourself."
            )
        self.bn_stats = bn_stats
        if bn_stats == "carry":
            running_stats(model)  # validates the BatchNorms (momentum) before any work
        self.checkpoint = resolve_policy(checkpoint, owner="MAML")
        self.first_order = bool(first_order)
        self.batching = batching
        self.task_chunk = task_chunk
        self.memory_budget = memory_budget
        self._footprints: dict[tuple, TaskFootprint] = {}
        self._param_shapes: dict[str, torch.Size] | None = None
        self.randomness = randomness
        self.check_finite = bool(check_finite)
        self.compile = resolve_compile(compile, "MAML")
        self._names = [name for name, _ in model.named_parameters()]
        self._buffers = BufferReader(model)
        self._call = ModuleCall(model)
        self.adapt_only = _resolve_subset(adapt_only, self._names)

    def __repr__(self) -> str:
        return (
            f"MAML({type(self.model).__name__}, inner_lr={self.inner_lr}, "
            f"adapt_only={self.adapt_only}, "
            f"checkpoint={self.checkpoint}, first_order={self.first_order}, "
            f"batching={self.batching!r}, task_chunk={self.task_chunk})"
        )

    # ---------------------------------------------------------------------------------------
    # one task

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        """The loss of ``params`` on one batch (a scalar tensor).

        With ``bn_stats="carry"``, ``params`` may also hold BatchNorm running statistics by
        buffer name (as :meth:`adapt` returns them); in eval mode BatchNorm then uses them.
        With ``bn_stats="track"`` in eval mode, BatchNorm uses the module's running statistics.
        """
        if self.bn_stats == "track" and not self.model.training:
            check_tracked(self.model, "MAML.loss")
        return self._query(params, batch, extras=False)[0]

    def batching_for(
        self, params: Params, tasks: Tasks, k: int, *, per_step: bool = False, hyper: Any = None
    ) -> Batching:
        """How a call with these arguments runs its tasks: ``batching``, or for ``"auto"`` its
        choice from :meth:`footprint` (``mode`` ``"loop"`` or ``"vmap"``, ``chunk``, ``reason``).

        Example:
            >>> maml.batching_for(params, tasks, 5).mode  # doctest: +SKIP
            'vmap'
        """
        n_tasks = self._check_tasks(params, tasks, k, per_step, "batching_for")
        self._check_hyper(params, hyper, "batching_for")
        return self._batching(params, tasks.support, tasks.query, k, per_step, hyper, n_tasks)

    def footprint(
        self, params: Params, tasks: Tasks, *, per_step: bool = False, hyper: Any = None
    ) -> TaskFootprint:
        """What one task holds: its inner step's and query pass's autograd graphs, its carry.

        Measured once per shape on the first task (the saved-tensor bytes of one inner step and
        of one query loss, beyond their inputs; ``fmaml._footprint``), and cached: it is what
        ``batching="auto"`` and ``checkpoint="auto"`` decide from. ``k`` steps with every graph
        kept hold about ``k * (step_bytes + carry_bytes)`` plus the query graph.

        Example:
            >>> fp = maml.footprint(params, tasks)  # doctest: +SKIP
            >>> fp.step_bytes / 2**20, fp.query_bytes / 2**20  # MiB  # doctest: +SKIP
        """
        self._check_tasks(params, tasks, 1, per_step, "footprint")
        self._check_hyper(params, hyper, "footprint")
        return self._footprint(params, tasks.support, tasks.query, per_step, hyper)

    def predict(self, params: Params, x: Any, *, batched: bool = False) -> Any:
        """The model's outputs on ``x`` at ``params``, under fmaml's BatchNorm convention.

        As the query loss sees them: BatchNorm normalises with the batch statistics of ``x``
        (``bn_stats="batch"``), with a task's carried statistics in eval mode (``"carry"``:
        ``params`` as :meth:`adapt` returns them) or with the module's running statistics in
        eval mode (``"track"``). The module's buffers are never written. Differentiable with
        respect to ``params``; wrap it in ``torch.no_grad()`` for evaluation.

        Args:
            params: ``{name: tensor}``, e.g. from :meth:`adapt`. With ``batched=True`` each leaf
                has a leading task dimension ``T`` (``adapt(..., batched=True)``) or none (the
                same tensor for every task).
            x: the model's input for one task, ``(M, ...)``; with ``batched=True``, ``(T, M,
                ...)``. Tasks are batched as ``batching`` says (``vmap`` or a loop), which also
                works for BatchNorm networks (a plain ``vmap(functional_call)`` does not).

        Returns:
            ``model(x)`` at ``params``: ``(M, ...)``, or ``(T, M, ...)`` with ``batched=True``.

        Example:
            >>> adapted = maml.adapt(params, tasks.support, 5, batched=True)  # doctest: +SKIP
            >>> logits = maml.predict(adapted, tasks.query[0], batched=True)  # doctest: +SKIP
            >>> accuracy = (logits.argmax(-1) == tasks.query[1]).float().mean()  # doctest: +SKIP
        """
        where = "predict"
        stats = set(inner_buffers(self.model)) if self.bn_stats == "carry" else set()
        self._check_params(params, where, batched=batched, allow=stats)
        _check_batch(x, "x", where, min_dim=2 if batched else 1)
        if self.bn_stats == "track" and not self.model.training:
            check_tracked(self.model, f"MAML.{where}")
        if not batched:
            return self._run(params, x, query=True)[0]
        n_tasks = _check_leading(x, None, where, "x")
        shapes = self._shapes()  # (checked above: each leaf has the model's shape, or a (T, ...))
        dims = {n: None if p.shape == shapes[n] else 0 for n, p in params.items()}
        for name, dim in dims.items():
            if dim == 0 and params[name].shape[0] != n_tasks:
                raise ValueError(
                    f"MAML.predict: `params[{name!r}]` has {params[name].shape[0]} tasks "
                    f"(shape {tuple(params[name].shape)}) but `x` has {n_tasks}; pass the "
                    "parameters adapted on these tasks."
                )
        if n_tasks == 0:
            raise ValueError("MAML.predict: `x` holds no tasks (batched=True, leading size 0).")

        def one(p: Params, inputs: Any) -> Any:
            return self._run(p, inputs, query=True)[0]

        first = {n: v[0] if dims[n] == 0 else v for n, v in params.items()}
        run = self._batching(first, None, x, 0, False, None, n_tasks, inputs_only=True)
        parts = []
        for start, stop in run.chunks(n_tasks):
            p = {n: v[start:stop] if dims[n] == 0 else v for n, v in params.items()}
            inputs = _slice_tree(x, start, stop)
            if stop - start == 1:
                first = {n: v[0] if dims[n] == 0 else v for n, v in p.items()}
                out = one(first, _slice_tree(inputs, 0, None, index=True))
                parts.append(optree.tree_map(lambda t: t[None], out))
            else:
                parts.append(vmap(one, in_dims=(dims, 0), randomness=self.randomness)(p, inputs))
        return optree.tree_map(lambda *ts: torch.cat(ts), *parts)

    def _shapes(self) -> dict[str, torch.Size]:
        """The shapes of the model's parameters and (carry mode) running statistics, read once
        (as their names are, in ``__init__``)."""
        if self._param_shapes is None:
            shapes = {n: p.shape for n, p in self.model.named_parameters()}
            if self.bn_stats == "carry":
                shapes.update({n: t.shape for n, t in running_stats(self.model).items()})
            self._param_shapes = shapes
        return self._param_shapes

    def _run(self, params: Params, x: Any, *, query: bool) -> tuple[Any, Any]:
        """``model(x)`` at ``params`` under the buffer convention: ``(outputs, collector)``.

        ``collector`` (None when no BatchNorm statistics are read) holds the momentum-updated
        carried statistics (``bn_stats="carry"``) and the batch statistics of the BatchNorms
        (``"carry"``; ``"track"`` on a query pass in train mode).
        """
        buffers = self._buffers()
        if buffers:
            stats = {n: t for n, t in params.items() if n in buffers}
            weights = {n: t for n, t in params.items() if n not in buffers}
        else:  # no buffers (an MLP, a conv net without BatchNorm): the parameters as they are
            stats, weights = {}, params
        if query and self.bn_stats == "track":
            stats = module_running_stats(self.model)
        if stats:
            context = collect_running_stats(stats)
        elif transforms_active():  # the plain-ops BatchNorm matters under vmap only
            context = batch_norm_in_plain_ops()
        else:
            context = contextlib.nullcontext()
        merged = {**weights, **buffers, **stats} if buffers or stats else weights
        with context as collector:
            out = self._call(merged, (x,))
        return out, collector

    def _query(
        self, params: Params, batch: Batch, extras: bool = True
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """A query pass: the loss, and ``{"metrics": ..., "bn": ...}`` from the same pass.

        ``metrics``: what ``metrics`` computes on the outputs; ``bn``: the BatchNorms' batch
        statistics, for ``bn_stats="track"`` in train mode. Both detached.
        """
        if self.forward is not None:
            return self._scalar(self.forward(params, batch)), {}
        x, y = batch
        out, collector = self._run(params, x, query=True)
        value = self._scalar(self.loss_fn(out, y))
        found: dict[str, Any] = {}
        if extras and self.metrics is not None:
            found["metrics"] = self._metrics(out, y)
        if extras and self.bn_stats == "track" and collector is not None and collector.batch:
            found["bn"] = dict(collector.batch)
        return value, found

    def _metrics(self, out: Any, y: Any) -> dict[str, torch.Tensor]:
        values = self.metrics(detached(out), y)
        if not isinstance(values, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in values.items()
        ):
            shown = (
                {k: describe_leaf(v) for k, v in values.items()}
                if isinstance(values, dict)
                else describe_leaf(values)
            )
            raise TypeError(
                f"MAML: `metrics` must return a dict {{name: tensor}}, e.g. {{'accuracy': "
                f"(out.argmax(-1) == y).float().mean()}}, got {shown}."
            )
        return {k: v.detach() for k, v in values.items()}

    def _loss_and_stats(
        self, params: Params, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """An inner pass: the loss, and the running statistics it updated (carry mode)."""
        updated: dict[str, torch.Tensor] = {}
        if self.forward is not None:
            value = self.forward(params, batch)
        else:
            x, y = batch
            out, collector = self._run(params, x, query=False)
            updated = collector.updated if collector is not None else {}
            value = self.loss_fn(out, y)
        return self._scalar(value), updated

    def _scalar(self, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            what = describe_leaf(value)
            raise ValueError(
                f"MAML: the loss must be a scalar tensor, but "
                f"`{'forward' if self.forward else 'loss_fn'}` returned {what}. Reduce it "
                "(e.g. reduction='mean')."
            )
        return value

    def inner_step(self, params: Params, batch: Batch, hyper: Any = None) -> Params:
        """One inner step, ``θ - α ∇L(θ; batch)`` for SGD; pure (returns new tensors).

        With a stateful ``inner_opt`` this is its first step from a fresh state.

        Example:
            >>> new_params = maml.inner_step(params, (x, y))  # doctest: +SKIP
        """
        self._check_hyper(params, hyper, "inner_step")
        adapted, frozen = self._split(params)
        carry = (adapted, self.inner_opt.init(adapted), self._initial_stats())
        (new, _, _), _ = self._step(carry, batch, hyper, frozen)
        return {name: new.get(name, frozen.get(name)) for name in params}

    def _initial_stats(self) -> dict[str, torch.Tensor]:
        return running_stats(self.model) if self.bn_stats == "carry" else {}

    def _split(self, params: Params) -> tuple[Params, Params]:
        """(adapted, frozen): the parameters the inner loop changes, and the rest."""
        if self.adapt_only is None:
            return params, {}
        adapted = {n: p for n, p in params.items() if n in self.adapt_only}
        return adapted, {n: p for n, p in params.items() if n not in self.adapt_only}

    def _step(
        self, carry: tuple[Params, Any, dict], batch: Batch, hyper: Any, frozen: Params
    ) -> tuple[tuple[Params, Any, dict], torch.Tensor]:
        """One inner step on the carry ``(adapted params, optimizer state, BN statistics)``."""
        adapted, state, stats = carry
        if self.max_grad_grad_norm is not None:
            adapted = optim.clip_backward(adapted, self.max_grad_grad_norm)
        grads, (value, updated) = grad_and_value_any(
            lambda a: self._loss_and_stats(
                {**frozen, **a, **stats} if frozen or stats else a, batch
            ),
            (adapted,),
            context=(frozen, stats, batch),
        )
        if self.first_order:
            grads = {name: g.detach() for name, g in grads.items()}
        new, state = optim.update_and_apply(self.inner_opt, grads, state, adapted, hyper)
        stats = {name: updated.get(name, t) for name, t in stats.items()}
        return (new, state, stats), value.detach()

    def _adapt_one(
        self,
        params: Params,
        support: Batch,
        k: int,
        per_step: bool,
        hyper: Any,
        policy: Policy | None = None,
    ) -> tuple[Params, torch.Tensor]:
        """``k`` inner steps on one task; returns the adapted params and the (k,) loss history."""
        policy = self.checkpoint if policy is None else policy
        adapted, frozen = self._split(params)
        new, history, stats = self._inner(
            self._unroll, adapted, frozen, support, k, per_step, hyper, policy
        )
        return {**{name: new.get(name, frozen.get(name)) for name in params}, **stats}, history

    def _inner(
        self,
        unroll: Callable[..., tuple[Params, torch.Tensor, dict[str, torch.Tensor]]],
        adapted: Params,
        frozen: Params,
        support: Batch,
        k: int,
        per_step: bool,
        hyper: Any,
        policy: Policy,
    ) -> tuple[Params, torch.Tensor, dict[str, torch.Tensor]]:
        """The inner loop through ``unroll`` (:meth:`_unroll`, one task, or
        :meth:`_unroll_batch`, a batch): the adapted parameters, the history and the statistics.

        First-order MAML: θ_k = θ + Δ with Δ constant in θ, so the inner loop needs no graph of
        the parameters. Learned rates keep theirs: Δ depends on them (the inner gradients are
        still constants), as in learn2learn's first-order Meta-SGD."""
        if not self.first_order:
            return unroll(adapted, support, k, per_step, hyper, frozen, policy)
        plain = {name: p.detach() for name, p in adapted.items()}
        rest = {name: p.detach() for name, p in frozen.items()}
        if hyper is None:
            with torch.no_grad():
                new, history, stats = unroll(plain, support, k, per_step, None, rest, "store_all")
        else:
            new, history, stats = unroll(plain, support, k, per_step, hyper, rest, policy)
        return {n: p + (new[n] - p.detach()) for n, p in adapted.items()}, history, stats

    def _scan_steps(
        self,
        step: Callable[..., tuple[tuple[Params, Any, dict], torch.Tensor]],
        init: tuple[Params, Any, dict],
        support: Batch,
        k: int,
        per_step: bool,
        hyper: Any,
        frozen: Params,
        checkpoint: Any,
    ) -> tuple[tuple[Params, Any, dict], torch.Tensor]:
        """``k`` applications of ``step(carry, batch, hyper, frozen)`` as one scan: over the
        per-step batches of ``support`` (``per_step``), or on ``support`` at every step."""
        if per_step:
            return scan(
                lambda c, batch, consts: step(c, batch, *consts),
                init,
                support,
                checkpoint=checkpoint,
                consts=(hyper, frozen),
                compile=self.compile,
            )
        return scan(
            lambda c, _, consts: step(c, consts[0], *consts[1:]),
            init,
            length=k,
            checkpoint=checkpoint,
            consts=(support, hyper, frozen),
            compile=self.compile,
        )

    def _unroll(
        self,
        adapted: Params,
        support: Batch,
        k: int,
        per_step: bool,
        hyper: Any,
        frozen: Params,
        checkpoint: Any,
    ) -> tuple[Params, torch.Tensor, dict[str, torch.Tensor]]:
        init = (adapted, self.inner_opt.init(adapted), self._initial_stats())
        (new, _, stats), history = self._scan_steps(
            self._step, init, support, k, per_step, hyper, frozen, checkpoint
        )
        return new, history, stats

    # ---------------------------------------------------------------------------------------
    # a chunk of tasks as one batch under plain autograd

    def _batched(self, run: Batching) -> bool:
        """Whether a ``vmap`` chunk runs as one batch under plain autograd: every forward pass
        is vmapped over the tasks, and the inner gradients are plain autograd's gradients of
        the summed task losses with respect to per-task parameters (each task's gradient is
        its own loss's). No ``torch.func.grad`` level runs inside ``vmap``, which is 1.5x-2x
        faster for small models. Used where no ``torch.func`` level is active (the default
        route of ``unrolled_loss`` and ``meta_grad``) and without ``max_grad_grad_norm``."""
        return run.mode == "vmap" and not transforms_active() and self.max_grad_grad_norm is None

    def _adapt_batch(
        self,
        params: Params,
        support: Batch,
        k: int,
        per_step: bool,
        hyper: Any,
        policy: Policy,
        n: int,
    ) -> tuple[Params, torch.Tensor]:
        """:meth:`_adapt_one` for ``n`` tasks at once (every returned leaf has a leading ``n``,
        the history is ``(n, k)``)."""
        adapted, frozen = self._split(params)
        batch = {name: p.expand(n, *p.shape) for name, p in adapted.items()}
        if per_step:  # (T, k, N, ...) -> (k, T, N, ...): the scan slices the steps
            support = optree.tree_map(lambda t: t.movedim(1, 0), support)
        new, history, stats = self._inner(
            self._unroll_batch, batch, frozen, support, k, per_step, hyper, policy
        )
        out = {
            name: new[name] if name in new else frozen[name].expand(n, *frozen[name].shape)
            for name in params
        }
        return {**out, **stats}, history

    def _unroll_batch(
        self,
        adapted: Params,
        support: Batch,
        k: int,
        per_step: bool,
        hyper: Any,
        frozen: Params,
        checkpoint: Any,
    ) -> tuple[Params, torch.Tensor, dict[str, torch.Tensor]]:
        n = next(iter(adapted.values())).shape[0]
        state = self.inner_opt.init(adapted)
        if flatten(state)[0]:  # a state per task (Adam's step count, say): init under vmap
            state = vmap(self.inner_opt.init)(adapted)
        stats = {name: t.expand(n, *t.shape) for name, t in self._initial_stats().items()}
        (new, _, stats), history = self._scan_steps(
            self._step_batch,
            (adapted, state, stats),
            support,
            k,
            per_step,
            hyper,
            frozen,
            checkpoint,
        )
        history = history.movedim(0, 1) if history.dim() == 2 else history.new_zeros(n, 0)
        return new, history, stats

    def _step_batch(
        self, carry: tuple[Params, Any, dict], batch: Batch, hyper: Any, frozen: Params
    ) -> tuple[tuple[Params, Any, dict], torch.Tensor]:
        """:meth:`_step` for a batch of tasks: carry leaves and ``batch`` have a leading ``T``."""
        adapted, state, stats = carry

        def one(a: Params, b: Batch, s: dict) -> tuple[torch.Tensor, dict]:
            return self._loss_and_stats({**frozen, **a, **s} if frozen or s else a, b)

        def total(a: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, dict]]:
            losses, updated = vmap(one, randomness=self.randomness)(a, batch, stats)
            return losses.sum(), (losses, updated)

        grads, (_, (losses, updated)) = grad_and_value_any(
            total, (adapted,), context=(frozen, stats, batch)
        )
        if self.first_order:
            grads = {name: g.detach() for name, g in grads.items()}
        if optim.elementwise(self.inner_opt):  # the same on a batch of tasks as on each
            new, state = optim.update_and_apply(self.inner_opt, grads, state, adapted, hyper)
        else:
            new, state = vmap(
                lambda g, st, p: optim.update_and_apply(self.inner_opt, g, st, p, hyper),
                randomness=self.randomness,
            )(grads, state, adapted)
        stats = {name: updated.get(name, t) for name, t in stats.items()}
        return (new, state, stats), losses.detach()

    # ---------------------------------------------------------------------------------------
    # public, batched

    def adapt(
        self,
        params: Params,
        support: Batch,
        k: int,
        *,
        batched: bool = False,
        per_step: bool = False,
        return_history: bool = False,
        hyper: Any = None,
    ) -> Params | tuple[Params, torch.Tensor]:
        """Fine-tune ``params`` with ``k`` inner steps on ``support`` (for evaluation).

        Args:
            params: the initial parameters.
            support: one task's batch, leaves ``(N, ...)``; with ``batched=True`` a batch of tasks,
                leaves ``(T, N, ...)`` (then every returned parameter has a leading ``T``; the
                tasks are batched as ``batching`` and ``task_chunk`` say); with
                ``per_step=True`` one batch per step, leaves ``(k, N, ...)`` (``(T, k, N, ...)``).
            k: the number of inner steps (>= 0).
            return_history: also return the inner losses, shape ``(k,)`` (or ``(T, k)``).

        Returns:
            The adapted parameters (and the loss history). Differentiable with respect to
            ``params`` through the checkpointed scan.
        """
        if isinstance(support, Tasks):
            raise TypeError(
                "MAML.adapt: `support` is an fmaml.Tasks (support and query); adapt takes the "
                "support batch only: maml.adapt(params, tasks.support, k, batched=True) for a "
                "batch of tasks (then maml.predict(adapted, tasks.query[0], batched=True))."
            )
        self._check_params(params, "adapt")
        self._check_k(k, "adapt")
        self._check_hyper(params, hyper, "adapt")
        self._check_pair(support, "support", "adapt")
        task_dim = 1 if batched else 0
        leaves = _check_batch(
            support, "support", "adapt", min_dim=task_dim + (2 if per_step else 1)
        )
        if per_step:
            _check_per_step(leaves, support, "support", k, task_dim, "adapt")
        if batched:
            n_tasks = _check_leading(support, None, "adapt", "support")
            if n_tasks == 0:
                raise ValueError(
                    "MAML.adapt: `support` holds no tasks (batched=True, but its leaves have a "
                    "leading size 0); pass at least one task."
                )
            run = self._batching(params, support, None, k, per_step, hyper, n_tasks)
            parts = [
                self._adapt_tasks(
                    params, _slice_tree(support, start, stop), k, per_step, hyper, run
                )
                for start, stop in run.chunks(n_tasks)
            ]
            adapted = {name: torch.cat([a[name] for a, _ in parts]) for name in parts[0][0]}
            history = torch.cat([h for _, h in parts])
        else:
            adapted, history = self._adapt_one(params, support, k, per_step, hyper)
        if self.check_finite:
            _raise_if_not_finite(history if batched else history[None], None)
        return (adapted, history) if return_history else adapted

    def unrolled_loss(
        self,
        params: Params,
        tasks: Tasks,
        k: int,
        hyper: Any = None,
        *,
        per_step: bool = False,
        has_aux: bool = False,
        return_history: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The MAML meta-loss: the mean over tasks of the query loss after ``k`` inner steps.

        ``mean_t L(θ_k^t; query_t)`` with ``θ_{i+1}^t = θ_i^t - α ∇L(θ_i^t; support_t)``,
        ``θ_0^t = params``. Differentiate it with ``torch.func.grad`` (plain tensors) or
        ``loss.backward()`` (``nn.Parameter``\\ s); ``vmap(grad(...))`` and ``jacrev(grad(...))``
        compose.

        Args:
            params: ``{name: tensor}``, the meta-parameters.
            tasks: :class:`fmaml.Tasks`; every leaf has a leading task dimension ``T``.
            k: the number of inner steps (0: the plain query loss).
            per_step: the support leaves are ``(T, k, N, ...)``, one batch per inner step.
            hyper: learned hyperparameters of ``inner_opt`` (``inner_opt.init_hyper(params,
                0.01)`` for ``fmaml.optim.meta_sgd()``), a meta-parameter: differentiate with
                ``grad(maml.unrolled_loss, argnums=(0, 3))(params, tasks, k, hyper)``.
            has_aux: return ``(loss, aux)``, ``aux`` a :class:`fmaml.MetaAux` of what the same
                forward pass saw: the per-task query losses ``(T,)``, the inner losses ``(T, k)``
                and the ``metrics`` of the query predictions. Use
                ``torch.func.grad(maml.unrolled_loss, has_aux=True)(..., has_aux=True)`` for the
                meta-gradient and the metrics together; ``loss.backward()`` works as without it.
            return_history: deprecated: ``(loss, history)``, ``history`` the inner losses
                ``(T, k)``, which is ``aux.inner_losses`` of ``has_aux=True``.

        Example:
            >>> loss = maml.unrolled_loss(params, tasks, 5)  # doctest: +SKIP
            >>> meta_grads = torch.func.grad(maml.unrolled_loss)(params, tasks, 5)  # doctest: +SKIP
            >>> g, aux = torch.func.grad(maml.unrolled_loss, has_aux=True)(  # doctest: +SKIP
            ...     params, tasks, 5, has_aux=True)
        """
        where = "unrolled_loss"
        if return_history:
            if has_aux:
                raise TypeError(
                    "MAML.unrolled_loss: pass `has_aux=True` alone; `return_history` is "
                    "deprecated (its history is aux.inner_losses)."
                )
            warnings.warn(
                "MAML.unrolled_loss: `return_history=True` is deprecated; use has_aux=True, "
                "which returns (loss, aux) with the same history as aux.inner_losses (T, k).",
                DeprecationWarning,
                stacklevel=2,
            )
        n_tasks = self._check_tasks(params, tasks, k, per_step, where)
        self._check_hyper(params, hyper, where)
        loss, aux = self._accumulated(params, tasks, k, hyper, per_step, n_tasks, where)
        loss = _explain_backward(loss, where)
        if return_history:
            return loss, aux.inner_losses
        return (loss, aux) if has_aux else loss

    def meta_grad(
        self,
        params: Params,
        tasks: Tasks,
        k: int,
        hyper: Any = None,
        *,
        per_step: bool = False,
        has_aux: bool = False,
    ) -> tuple[Any, Any]:
        """``(meta-loss, meta-gradient)``: ``torch.func.grad_and_value(self.unrolled_loss)``.

        Like :meth:`unrolled_loss`, it holds one chunk of tasks' graphs at a time (one task with
        ``batching="loop"``). With ``hyper`` (learned rates) the gradient is the pair
        ``(params_grad, hyper_grad)``. With ``has_aux=True``, ``((meta-loss, aux),
        meta-gradient)`` (``jax.value_and_grad``'s layout), ``aux`` the :class:`fmaml.MetaAux`
        of :meth:`unrolled_loss`.

        For training loops: outside ``torch.func`` transforms the results carry no graph, even
        when ``params`` require grad (as ``.grad`` after ``loss.backward()``). To differentiate
        the meta-gradient again, differentiate :meth:`unrolled_loss` (``jacrev(grad(...))``, or
        ``torch.autograd.grad(..., create_graph=True)``); under ``torch.func`` transforms this
        method composes as ``torch.func.grad_and_value`` does.

        Example:
            >>> (loss, aux), g = maml.meta_grad(params, tasks, 5, has_aux=True)  # doctest: +SKIP
        """
        where = "meta_grad"
        n_tasks = self._check_tasks(params, tasks, k, per_step, where)
        self._check_hyper(params, hyper, where)
        argnums = 0 if hyper is None else (0, 1)
        if not transforms_active():  # no graph of the meta-gradient (see above)
            params = {name: p.detach() for name, p in params.items()}
            hyper = optree.tree_map(torch.Tensor.detach, hyper, none_is_leaf=False)
            direct = self._direct_meta_grad(params, tasks, k, hyper, per_step, n_tasks, where)
            if direct is not None:
                grads, loss, aux = direct
                return ((loss, aux), grads) if has_aux else (loss, grads)
        # closures=False: the result is the gradient with respect to `params` (and `hyper`)
        # alone, so a tensor the loss closes over is a constant here, as under grad_and_value,
        # and the probe for closures (a forward pass of its own each call) has nothing to guard
        grads, (loss, aux) = grad_and_value_any(
            lambda p, h: self._accumulated(p, tasks, k, h, per_step, n_tasks, where, False),
            (params, hyper),
            argnums,
            context=tasks,
        )
        return ((loss, aux), grads) if has_aux else (loss, grads)

    def _direct_meta_grad(
        self,
        params: Params,
        tasks: Tasks,
        k: int,
        hyper: Any,
        per_step: bool,
        n_tasks: int,
        where: str,
    ) -> tuple[Any, torch.Tensor, MetaAux] | None:
        """``(meta-gradient, meta-loss, aux)`` straight from the pieces' gradients
        (:func:`fmaml._accumulate.accumulate_with_grad`), for :meth:`meta_grad` outside
        ``torch.func`` transforms: the numbers ``grad_and_value`` of :meth:`_accumulated` gives,
        without an autograd Function and a backward pass around them. None where that route is
        needed: a hyperparameter that is not a floating-point tensor, or ``tasks`` that
        autograd records (``tasks`` requiring grad)."""
        h_leaves, h_spec = flatten(hyper)
        if not all(_is_floating(t) for t in h_leaves) or _records(tasks):
            return None
        _, pieces = self._pieces(params, tasks, k, hyper, per_step, n_tasks)
        p_leaves, p_spec = flatten(params)
        n_params = len(p_leaves)
        want = [True] * (n_params + len(h_leaves)) + [False] * len(flatten(tasks)[0])
        with torch.enable_grad():  # as grad_and_value (the pieces differentiate)
            loss, (query_losses, history, extras), grads = accumulate_with_grad(
                pieces, (params, hyper, tasks), want, compile=self.compile
            )
        out = self._finish(loss, query_losses, history, extras, where)
        p_grads = unflatten(p_spec, grads[:n_params])
        if hyper is None:
            return p_grads, *out
        return (p_grads, unflatten(h_spec, grads[n_params:])), *out

    def _pieces(
        self, params: Params, tasks: Tasks, k: int, hyper: Any, per_step: bool, n_tasks: int
    ) -> tuple[Batching, list[_Chunk]]:
        """How the tasks run, and the meta-loss's terms: one :class:`_Chunk` per chunk."""
        run = self._batching(params, tasks.support, tasks.query, k, per_step, hyper, n_tasks)
        check = _check_history if self.check_finite else None
        one_policy = self._chunk_policy(run, 1)  # (one task: the same under any transform)

        # aux carries no gradient: detached here, or the inner losses' graph (step 0's forward
        # pass, under Auto's measured first step) would live as long as the aux
        def task_loss(p: Params, h: Any, task: Tasks) -> tuple[torch.Tensor, Any]:
            # a chunk of one task (every chunk of the loop) sees that task alone, without a task
            # dimension and without vmap (which would turn convolutions with per-task weights
            # into slower grouped convolutions)
            loss, history, extras = self._task_loss(
                p, task.support, task.query, k, per_step, h, one_policy
            )
            aux = tree_map(lambda t: t.detach().unsqueeze(0), (loss, history, extras))
            return loss / n_tasks, aux

        def chunk_loss(p: Params, h: Any, chunk: Tasks) -> tuple[torch.Tensor, Any]:
            losses, history, extras = self._task_losses(p, chunk, k, per_step, h, run)
            return losses.sum() / n_tasks, detached((losses, history, extras))

        return run, [
            _Chunk(task_loss, start, None, check)
            if stop - start == 1
            else _Chunk(chunk_loss, start, stop, check)
            for start, stop in run.chunks(n_tasks)
        ]

    def _finish(
        self,
        loss: torch.Tensor,
        query_losses: torch.Tensor,
        history: torch.Tensor,
        extras: dict[str, Any],
        where: str,
    ) -> tuple[torch.Tensor, MetaAux]:
        """After the pieces: the finiteness check, BN tracking and the :class:`MetaAux`."""
        if self.check_finite:
            _raise_if_query_not_finite(loss)
        self._track(extras, where)
        return loss, _meta_aux(query_losses, history, extras)

    def _accumulated(
        self,
        params: Params,
        tasks: Tasks,
        k: int,
        hyper: Any,
        per_step: bool,
        n_tasks: int,
        where: str,
        closures: bool = True,
    ) -> tuple[torch.Tensor, MetaAux]:
        """The meta-loss and its :class:`MetaAux`, one chunk of tasks at a time: each chunk's
        gradient is taken and its graph freed before the next chunk starts
        (:func:`fmaml._accumulate.accumulate`). With ``bn_stats="track"`` in train mode, the
        module's running statistics take this meta-step's one update here, from the query
        passes of the forward pass (a recomputation in a backward pass returns no aux).
        ``closures``: probe for a closure over a differentiated tensor first
        (:meth:`_check_no_closure`); :meth:`meta_grad`, whose result holds no such gradient,
        skips it."""
        _, pieces = self._pieces(params, tasks, k, hyper, per_step, n_tasks)
        loss, (query_losses, history, extras) = accumulate(
            pieces,
            (params, hyper, tasks),
            check=(lambda: self._check_no_closure(params, tasks, hyper, per_step))
            if closures
            else None,
            compile=self.compile,
        )
        return self._finish(loss, query_losses, history, extras, where)

    def _check_no_closure(self, params: Params, tasks: Tasks, hyper: Any, per_step: bool) -> None:
        """Raise if the inner step reads a tensor that is being differentiated (by autograd or a
        ``torch.func`` transform) but is not an argument: a closure in ``loss_fn``, ``forward``
        or ``inner_opt``, whose gradient :func:`accumulate` would lose. At the caller's level,
        on untracked copies of the arguments: the first task's support loss, and an optimizer
        update of zero gradients. Anything they return that is tracked came from a closure
        (tracking follows the operations, not the values)."""
        support = _slice_tree(tasks.support, 0, None, index=True)
        if per_step:
            support = _slice_tree(support, 0, None, index=True)
        with torch.no_grad():
            plain = {name: p.detach() for name, p in params.items()}
            batch = optree.tree_map(lambda t: t.detach(), support)
            h = optree.tree_map(lambda t: t.detach(), hyper, none_is_leaf=False)
            adapted, _ = self._split(plain)
            zeros = {name: torch.zeros_like(p) for name, p in adapted.items()}
        with preserve_rng(cuda_devices(plain.values())):  # the check draws no random numbers
            loss, _ = self._loss_and_stats({**plain, **self._initial_stats()}, batch)
            updates, _ = self.inner_opt.update(zeros, self.inner_opt.init(adapted), adapted, h)
        if any(_tracked(t) for t in flatten((loss, updates))[0]):
            raise ValueError(
                "MAML: the loss reads a tensor that is being differentiated (it requires grad, "
                "or a torch.func transform tracks it) but is not an argument (a closure in "
                "`loss_fn`, `forward` or `inner_opt`?): its gradient would be lost. Pass it in "
                "`params` (with `forward=`, read it from there) or `hyper` instead."
            )

    def _track(self, extras: dict[str, Any], where: str) -> None:
        """``bn_stats="track"``: this meta-step's one update of the module's running statistics."""
        if self.bn_stats == "track" and self.model.training:
            update_running_stats(self.model, extras.get("bn", {}), f"MAML.{where}")

    def reptile_grad(
        self, params: Params, support: Batch, k: int, hyper: Any = None, *, per_step: bool = False
    ) -> Params:
        """Reptile's meta-update direction (Nichol et al., 2018), as a gradient.

        ``g = θ - mean_t θ_k^t``, where ``θ_k^t`` is ``params`` after ``k`` inner steps on task
        ``t``'s ``support`` (leaves ``(T, N, ...)``; Reptile usually adapts on all of a task's
        data). A step ``θ ← θ - ε g`` of any ``torch.optim`` optimizer moves the initialisation
        towards the adapted parameters. No graph is built.

        Example:
            >>> g = maml.reptile_grad(params, (xs, ys), 5)  # doctest: +SKIP
        """
        with torch.no_grad():
            detached = {name: p.detach() for name, p in params.items()}
            adapted = self.adapt(detached, support, k, batched=True, per_step=per_step, hyper=hyper)
        return reptile_direction(detached, adapted)

    # ---------------------------------------------------------------------------------------
    # internals

    def _batching(
        self,
        params: Params,
        support: Batch | None,
        query: Batch | None,
        k: int,
        per_step: bool,
        hyper: Any,
        n_tasks: int,
        *,
        inputs_only: bool = False,
    ) -> Batching:
        """How this call runs its tasks (``batching``; the rule of ``fmaml._batching``).
        ``inputs_only``: ``query`` holds the model's inputs alone (:meth:`predict`)."""
        auto = isinstance(self.checkpoint, Auto) and self.checkpoint.graph_bytes is None
        footprint = None
        if self.batching == "auto" or auto:  # the scans' step graph: measured here, once
            footprint = self._footprint(params, support, query, per_step, hyper, inputs_only)
        if self.batching == "loop":
            run = Batching("loop", None, "batching='loop'", footprint)
        elif self.batching == "vmap":
            run = Batching("vmap", self.task_chunk, "batching='vmap'", footprint)
        else:
            device = next(iter(params.values())).device
            budget = int(self.memory_budget or default_budget(device))
            run = choose(footprint, n_tasks, k, device, budget, self._checkpoint_budget(k))
        record_batching(run)
        return run

    def _checkpoint_budget(self, k: int) -> float:
        """The most one task's inner loop holds under ``checkpoint`` (for ``batching="auto"``)."""
        if isinstance(self.checkpoint, Auto):
            return self.checkpoint.budget
        return math.inf if isinstance(self.checkpoint, StoreAll) else 0

    def _footprint(
        self,
        params: Params,
        support: Batch | None,
        query: Batch | None,
        per_step: bool,
        hyper: Any,
        inputs_only: bool = False,
    ) -> TaskFootprint:
        """One task's step and query graphs, measured once per shape on plain samples (no step
        without ``support``, no query pass without ``query``)."""
        # one task's shapes: the batches' leaves without the task (and step) dimension
        drop = 2 if per_step else 1
        key = (
            inputs_only,
            _shape_key((params, hyper)),
            _shape_key(support, drop),
            _shape_key(query, 1),
        )
        found = self._footprints.get(key)
        if found is None:
            support0 = None if support is None else _slice_tree(support, 0, None, index=True)
            if per_step:
                support0 = _slice_tree(support0, 0, None, index=True)
            query0 = None if query is None else _slice_tree(query, 0, None, index=True)
            found = self._measure(params, support0, query0, hyper, inputs_only)
            self._footprints[key] = found
        return found

    def _measure(
        self,
        params: Params,
        support0: Batch | None,
        query0: Batch | None,
        hyper: Any,
        inputs_only: bool,
    ) -> TaskFootprint:
        devices = cuda_devices(params.values())
        with preserve_rng(devices), plain_autograd(), torch.enable_grad():
            p = {n: sample(t).requires_grad_() for n, t in params.items()}
            h = optree.tree_map(_sample_tracked, hyper, none_is_leaf=False)
            mine = [*p.values(), *flatten(h)[0]]
            step = SavedBytes(mine)
            if support0 is not None:
                with step:
                    self.inner_step(p, optree.tree_map(sample, support0), h)
            query = SavedBytes(mine)
            if query0 is not None:
                with query:
                    q = optree.tree_map(sample, query0)
                    self._run(p, q, query=True) if inputs_only else self.loss(p, q)
        adapted, _ = self._split(p)
        carry = flatten((adapted, self.inner_opt.init(adapted), self._initial_stats()))[0]
        return TaskFootprint(
            step_bytes=step.bytes,
            query_bytes=query.bytes,
            carry_bytes=sum(_nbytes(t) for t in carry if isinstance(t, torch.Tensor)),
            param_bytes=sum(_nbytes(t) for t in p.values()),
            tensors=step.tensors + query.tensors + len(p),
        )

    def _chunk_policy(self, run: Batching, size: int) -> Policy:
        """The checkpoint policy of a chunk of ``size`` tasks. ``"auto"`` gets the step graph
        measured for this call's shapes (its scans need not measure it again), and the default
        budget is per task: a ``vmap`` of ``size`` tasks gets ``size`` times it."""
        policy = self.checkpoint
        if not isinstance(policy, Auto) or policy.graph_bytes is not None or run.footprint is None:
            return policy
        budget, graph = policy.budget_bytes, run.footprint.step_bytes
        if run.mode == "vmap" and size > 1:
            if budget is None:
                budget = size * policy.budget
            if self._batched(run):  # plain tensors with a task dimension: no vmap batch to see
                graph *= size
        return dataclasses.replace(policy, budget_bytes=budget, graph_bytes=graph)

    def _task_losses(
        self, params: Params, tasks: Tasks, k: int, per_step: bool, hyper: Any, run: Batching
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Each task's query loss ``(T,)``, inner losses ``(T, k)`` and query-pass extras, for a
        chunk of ``T > 1`` tasks batched with ``vmap`` (:meth:`_pieces` runs a chunk of one
        task, and the loop's, without it)."""
        n = _n_tasks(tasks.support)
        # (where the chunk runs: whether it is one plain batch depends on it)
        policy = self._chunk_policy(run, n)

        def one(support: Batch, query: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
            return self._task_loss(params, support, query, k, per_step, hyper, policy)

        if self._batched(run):
            adapted, history = self._adapt_batch(
                params, tasks.support, k, per_step, hyper, policy, n
            )
            losses, extras = vmap(self._query, randomness=self.randomness)(adapted, tasks.query)
            return losses, history, extras
        if self.max_grad_grad_norm is not None:
            own = self._per_task_params(params, n)
            return vmap(
                lambda a, s, q: self._task_loss({**params, **a}, s, q, k, per_step, hyper, policy),
                randomness=self.randomness,
            )(own, tasks.support, tasks.query)
        return vmap(one, randomness=self.randomness)(tasks.support, tasks.query)

    def _task_loss(
        self,
        params: Params,
        support: Batch,
        query: Batch,
        k: int,
        per_step: bool,
        hyper: Any,
        policy: Policy | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        adapted, history = self._adapt_one(params, support, k, per_step, hyper, policy)
        loss, extras = self._query(adapted, query)
        return loss, history, extras

    def _per_task_params(self, params: Params, n_tasks: int) -> Params:
        """The adapted parameters with a task dimension (stride-0 views), for a vmap over tasks.

        ``clip_backward`` at the first inner step must see each task's own cotangent; on
        parameters shared by every task of a vmap it would see (and clip) their sum.
        """
        adapted, _ = self._split(params)
        return {name: p.expand(n_tasks, *p.shape) for name, p in adapted.items()}

    def _adapt_tasks(
        self, params: Params, support: Batch, k: int, per_step: bool, hyper: Any, run: Batching
    ) -> tuple[Params, torch.Tensor]:
        """``_adapt_one`` over a chunk of tasks (leading ``T``), batched as ``run`` says."""
        n = _n_tasks(support)
        policy = self._chunk_policy(run, n)
        if run.mode == "loop":
            parts = [
                self._adapt_one(
                    params, _slice_tree(support, t, None, index=True), k, per_step, hyper, policy
                )
                for t in range(n)
            ]
            adapted = {name: torch.stack([a[name] for a, _ in parts]) for name in parts[0][0]}
            return adapted, torch.stack([h for _, h in parts])
        if self._batched(run):
            return self._adapt_batch(params, support, k, per_step, hyper, policy, n)
        if self.max_grad_grad_norm is not None:  # see _per_task_params
            own = self._per_task_params(params, n)
            return vmap(
                lambda a, s: self._adapt_one({**params, **a}, s, k, per_step, hyper, policy),
                randomness=self.randomness,
            )(own, support)
        fn = vmap(
            lambda s: self._adapt_one(params, s, k, per_step, hyper, policy),
            randomness=self.randomness,
        )
        return fn(support)

    def _check_k(self, k: object, where: str) -> None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"MAML.{where}: `k` must be an int (inner steps), got {k!r}.")
        if k < 0:
            raise ValueError(f"MAML.{where}: `k` must be >= 0 (inner steps), got {k}.")

    def _check_params(
        self, params: object, where: str, *, batched: bool = False, allow: set[str] = frozenset()
    ) -> None:
        """Names (with ``loss_fn``, or for ``predict``), floating dtypes and shapes; ``allow``:
        further names (carried statistics); ``batched``: a leading task dimension is allowed."""
        if not isinstance(params, dict):
            raise TypeError(
                f"MAML.{where}: `params` must be a dict {{name: tensor}} (fmaml.params(model)), "
                f"got {type(params).__name__}."
            )
        if self.forward is None or where == "predict":
            missing = [n for n in self._names if n not in params]
            extra = [n for n in params if n not in self._names and n not in allow]
            if missing or extra:
                raise ValueError(
                    f"MAML.{where}: `params` does not match the model's parameters: "
                    f"missing {missing}, unexpected {extra}. Build it with fmaml.params(model)."
                )
        shapes = self._shapes()
        for name, p in params.items():
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise TypeError(
                    f"MAML.{where}: parameter {name!r} must be a floating-point tensor, got "
                    f"{describe_leaf(p)}."
                )
            want = shapes.get(name)
            if want is None or p.shape == want or (batched and p.shape[1:] == want):
                continue
            expected = f"{tuple(want)}" + (
                f" or (T, {', '.join(map(str, want))})" if batched else ""
            )
            hint = "Build `params` with fmaml.params(model), from the model MAML was given."
            if p.dim() == len(want) + 1 and p.shape[1:] == want:
                hint = (
                    "It has a leading task dimension (adapt(..., batched=True)): pick one task, "
                    "{n: p[t] for n, p in adapted.items()}"
                    + (", or pass batched=True." if where == "predict" else ".")
                )
            raise ValueError(
                f"MAML.{where}: parameter {name!r} has shape {tuple(p.shape)}, but the model's "
                f"{name!r} has shape {expected}. {hint}"
            )

    def _check_pair(self, batch: object, name: str, where: str) -> None:
        """With ``loss_fn``, a batch is an ``(inputs, targets)`` pair (``loss_fn(model(x), y)``)."""
        if self.forward is not None:
            return
        if isinstance(batch, tuple | list) and len(batch) == 2:
            return
        if isinstance(batch, torch.Tensor):
            got = f"a tensor {describe_leaf(batch)}"
        elif isinstance(batch, tuple | list):
            got = f"a {type(batch).__name__} of {len(batch)}"
        else:
            got = describe_leaf(batch)
        example = (
            "fmaml.Tasks(support=(xs, ys), query=(xq, yq)) with leaves (T, N, ...)"
            if name.startswith("tasks.")
            else "(x, y)"
        )
        raise TypeError(
            f"MAML.{where}: `{name}` must be an (inputs, targets) pair, e.g. {example}; got "
            f"{got}. For batches of another form pass `forward=fn` to fmaml.MAML."
        )

    def _check_hyper(self, params: Params, hyper: Any, where: str) -> None:
        """Learned rates (an ``inner_opt`` with ``init_hyper``) need ``hyper`` shaped as
        ``inner_opt.init_hyper`` shapes it for the adapted parameters; checked before any step."""
        init_hyper = getattr(self.inner_opt, "init_hyper", None)
        if init_hyper is None:
            return
        adapted, _ = self._split(params)
        build = "inner_opt.init_hyper(params, 0.01)"
        if self.adapt_only is not None:
            build = (
                "inner_opt.init_hyper({n: params[n] for n in maml.adapt_only}, 0.01) (the rates "
                "of the adapted parameters only)"
            )
        if hyper is None:
            raise ValueError(
                f"MAML.{where}: `inner_opt` has learned rates, so `hyper` is required: pass "
                f"hyper={build}."
            )
        if not isinstance(hyper, dict) or "lr" not in hyper:
            got = sorted(hyper) if isinstance(hyper, dict) else type(hyper).__name__
            raise ValueError(
                f"MAML.{where}: `hyper` must be a dict with the key 'lr', got {got}. Build it "
                f"with {build}."
            )
        want, got = _rate_shapes(self.inner_opt, adapted), hyper["lr"]
        if want is None:  # a learned-rate transformation of unknown layout: its update checks
            return
        if isinstance(want, dict):
            keys = list(got) if isinstance(got, dict) else []
            missing = [n for n in want if n not in keys]
            extra = [n for n in keys if n not in want]
            if not isinstance(got, dict) or missing or extra:
                what = "" if isinstance(got, dict) else f" (got {type(got).__name__})"
                raise ValueError(
                    f"MAML.{where}: `hyper['lr']` must be a dict with one rate per adapted "
                    f"parameter{what}: missing {missing}, unexpected {extra}. Build it with "
                    f"{build}."
                )
            pairs = [(f"hyper['lr'][{n!r}]", shape, got[n]) for n, shape in want.items()]
        else:
            pairs = [("hyper['lr']", want, got)]
        for path, shape, rate in pairs:
            if not isinstance(rate, torch.Tensor) or tuple(rate.shape) != shape:
                raise ValueError(
                    f"MAML.{where}: {path} must be a tensor of shape {shape}, got "
                    f"{describe_leaf(rate)}. Build it with {build}."
                )

    def _check_tasks(
        self, params: Params, tasks: object, k: int, per_step: bool, where: str
    ) -> int:
        self._check_params(params, where)
        self._check_k(k, where)
        if not isinstance(tasks, Tasks):
            raise TypeError(
                f"MAML.{where}: `tasks` must be fmaml.Tasks(support=..., query=...), got "
                f"{type(tasks).__name__}."
            )
        sup = _check_batch(tasks.support, "tasks.support", where, min_dim=3 if per_step else 2)
        _check_batch(tasks.query, "tasks.query", where, min_dim=2)
        self._check_pair(tasks.support, "tasks.support", where)
        self._check_pair(tasks.query, "tasks.query", where)
        n_tasks = _check_leading(tasks.support, tasks.query, where)
        if self.bn_stats == "track":
            if self.model.training:
                check_trackable(f"MAML.{where}")
            else:
                check_tracked(self.model, f"MAML.{where}")
        if n_tasks == 0:
            raise ValueError(
                f"MAML.{where}: `tasks` holds no tasks (its leaves have a leading size 0); "
                "pass at least one task."
            )
        if per_step:
            _check_per_step(sup, tasks.support, "tasks.support", k, 1, where)
        return n_tasks


# -------------------------------------------------------------------------------------------
# a chunk of tasks, one term of the meta-loss


@dataclass(frozen=True)
class _Chunk:
    """The term of the meta-loss of the tasks ``start:stop``: ``chunk(params, hyper, tasks)``;
    with ``stop`` None, of task ``start`` alone, without the task dimension.

    ``loss(params, hyper, chunk)`` sees the chunk's tasks only, so with ``compile=`` every chunk
    of one shape shares one compiled graph (:meth:`compiled_form`); ``check(aux, start)`` runs
    after it (``check_finite``).
    """

    loss: Callable[..., tuple[torch.Tensor, Any]]
    start: int
    stop: int | None
    check: Callable[[Any, int], None] | None = None

    def __call__(self, params: Params, hyper: Any, tasks: Tasks) -> tuple[torch.Tensor, Any]:
        value, aux = self.loss(params, hyper, self._tasks(tasks))
        if self.check is not None:
            self.check(aux, self.start)
        return value, aux

    def compiled_form(self, params: Params, hyper: Any, tasks: Tasks) -> Any:
        """``(loss, its arguments)`` to compile, or None (a check must see every chunk)."""
        if self.check is not None:
            return None
        return self.loss, (params, hyper, self._tasks(tasks))

    def _tasks(self, tasks: Tasks) -> Tasks:
        return _slice_tasks(tasks, self.start, self.stop, index=self.stop is None)


def _check_history(aux: Any, start: int) -> None:
    _raise_if_not_finite(aux[1], start)


# -------------------------------------------------------------------------------------------
# validation and slicing helpers


def _check_batch(batch: Batch, name: str, where: str, min_dim: int) -> list[torch.Tensor]:
    leaves, _ = flatten(batch)
    if not leaves:
        raise ValueError(f"MAML.{where}: `{name}` has no tensors.")
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= min_dim:
            continue
        path = leaf_paths(batch, name)[i]  # named on error only: a valid batch costs nothing
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"MAML.{where}: {path} must be a tensor, got {describe_leaf(leaf)}.")
        if leaf.dim() < min_dim:
            raise ValueError(
                f"MAML.{where}: {path} has shape {tuple(leaf.shape)}; expected at least {min_dim} "
                "dimensions (task, [step,] example, ...)."
            )
    return leaves


def _check_leading(
    support: Batch, query: Batch | None, where: str, support_name: str = "tasks.support"
) -> int:
    pairs = ((support, support_name), (query, "tasks.query"))
    trees = [(tree, name) for tree, name in pairs if tree is not None]
    leading = {leaf.shape[0] for tree, _ in trees for leaf in flatten(tree)[0]}
    if len(leading) == 1:
        return leading.pop()
    sizes: dict[str, int] = {}  # named on error only
    for tree, name in trees:
        for path, leaf in zip(leaf_paths(tree, name), flatten(tree)[0], strict=True):
            sizes[path] = leaf.shape[0]
    first_path, n = next(iter(sizes.items()))
    for path, size in sizes.items():
        if size != n:
            raise ValueError(
                f"MAML.{where}: every leaf of the tasks needs the same leading task dimension, "
                f"but {first_path} has {n} tasks and {path} has {size}."
            )
    return n


def _check_per_step(
    leaves: list[torch.Tensor], support: Batch, name: str, k: int, dim: int, where: str
) -> None:
    for i, leaf in enumerate(leaves):
        if leaf.shape[dim] != k:
            path = leaf_paths(support, name)[i]
            raise ValueError(
                f"MAML.{where}: with per_step=True, {path} needs {k} per-step batches in "
                f"dimension {dim}, got shape {tuple(leaf.shape)}."
            )


def _slice_tree(tree: Batch, start: int, stop: int | None, index: bool = False) -> Batch:
    leaves, spec = flatten(tree)
    return unflatten(spec, [leaf[start] if index else leaf[start:stop] for leaf in leaves])


def _n_tasks(batch: Batch) -> int:
    return flatten(batch)[0][0].shape[0]


def _slice_tasks(tasks: Tasks, start: int, stop: int | None, index: bool = False) -> Tasks:
    return Tasks(
        _slice_tree(tasks.support, start, stop, index), _slice_tree(tasks.query, start, stop, index)
    )


def _meta_aux(query_losses: torch.Tensor, history: torch.Tensor, extras: dict) -> MetaAux:
    """The :class:`MetaAux` of a meta-step, detached (the scan's per-step outputs are outputs of
    a differentiable Function, so its history has a ``grad_fn`` under plain autograd)."""
    return MetaAux(
        query_losses.detach(),
        history.detach(),
        {name: value.detach() for name, value in extras.get("metrics", {}).items()},
    )


class _ParamsDoNotRequireGrad(torch.autograd.Function):
    """The identity, whose backward explains why the meta-loss has no gradient to give."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, anchor: torch.Tensor, message: str) -> torch.Tensor:
        ctx.message = message
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(ctx.message)


def _explain_backward(loss: torch.Tensor, where: str) -> torch.Tensor:
    """``loss``, made to explain itself if ``loss.backward()`` is called on it although nothing
    it depends on requires grad (``params`` from ``fmaml.params(model)``: detached copies).

    Only outside ``torch.func`` transforms with grad mode on, where torch would answer
    ``loss.backward()`` with "element 0 of tensors does not require grad".
    """
    if loss.requires_grad or not torch.is_grad_enabled() or transforms_active():
        return loss
    message = (
        f"MAML.{where}: loss.backward() found no parameter that requires grad. `params` from "
        "fmaml.params(model) are detached copies, for torch.func.grad(maml.unrolled_loss)"
        "(params, tasks, k) (then fmaml.load_params(model, params) after training). For "
        "loss.backward() pass the module's own parameters: "
        "maml.unrolled_loss(dict(model.named_parameters()), tasks, k)."
    )
    anchor = torch.zeros((), device=loss.device, requires_grad=True)
    return _ParamsDoNotRequireGrad.apply(loss, anchor, message)


def _raise_if_query_not_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"MAML: the query loss is {loss.item()} (inner losses finite).")


def _raise_if_not_finite(history: torch.Tensor, offset: int | None) -> None:
    bad = ~torch.isfinite(history)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        task = where[0] + (offset or 0)
        step = where[1] if len(where) > 1 else 0
        raise FloatingPointError(
            f"MAML: the inner loss is {history[tuple(where)].item()} at task {task}, inner step "
            f"{step} (the first non-finite value). Lower `inner_lr` or check the data."
        )


def _shape_key(tree: Any, drop: int = 0) -> tuple:
    """What a measurement depends on: the structure, shapes (without the first ``drop``
    dimensions), dtypes and devices of ``tree``."""
    leaves, spec = flatten(tree)
    return (spec, *((tuple(t.shape[drop:]), t.dtype, t.device) for t in leaves))


def _sample_tracked(t: Any) -> Any:
    """A plain sample of a hyperparameter, requiring grad where it is differentiable."""
    out = sample(t)
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        out.requires_grad_()
    return out


def _resolve_subset(adapt_only: Sequence[str] | None, names: list[str]) -> frozenset | None:
    """The parameter names selected by ``adapt_only`` (exact names or module prefixes)."""
    if adapt_only is None:
        return None
    if isinstance(adapt_only, str) or not all(isinstance(a, str) for a in adapt_only):
        raise TypeError(
            "MAML: `adapt_only` must be a list of parameter names or module prefixes, e.g. "
            f"['head'] or ['head.weight', 'head.bias'], got {adapt_only!r}."
        )
    if not adapt_only:
        raise ValueError(
            "MAML: `adapt_only` is empty, so the inner loop would adapt nothing; pass None to "
            "adapt every parameter, or name the parameters to adapt (e.g. ['head'])."
        )
    chosen, unknown = set(), []
    for item in adapt_only:
        hits = [n for n in names if n == item or n.startswith(item + ".")]
        if not hits:
            unknown.append(item)
        chosen.update(hits)
    if unknown:
        raise ValueError(
            f"MAML: `adapt_only` names no parameter for {unknown}; the model's parameters are "
            f"{names}."
        )
    return frozenset(chosen)


def _rate_shapes(opt: GradientTransformation, adapted: Params) -> Any:
    """The shapes that ``opt.init_hyper(adapted, ...)["lr"]`` has (``torch.tensor`` in
    ``init_hyper`` cannot run inside ``torch.func`` transforms, so it is not called here)."""
    if isinstance(opt, optim._MetaSGD):
        return {name: tuple(p.shape) for name, p in adapted.items()}
    if isinstance(opt, optim._PerLayerLR):
        return {name: () for name in adapted}
    if isinstance(opt, optim._ScalarLR):
        return ()
    return None


def reptile_direction(params: Params, adapted: Params) -> Params:
    """``θ - mean_t θ^t``: Reptile's update direction from adapted parameters with a leading ``T``.

    ``fmaml.reptile_update`` in other words: ``θ - ε · reptile_direction(θ, adapted)`` is the
    Reptile meta-update with step size ``ε``.
    """
    missing = [name for name in params if name not in adapted]
    if missing:
        raise ValueError(f"reptile_direction: `adapted` lacks the parameters {missing}.")
    return {name: p - adapted[name].mean(0) for name, p in params.items()}
