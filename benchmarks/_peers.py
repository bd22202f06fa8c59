"""One meta-gradient of a :class:`benchmarks._workloads.Workload`, computed by each library.

:func:`make` ``(library, workload, **options)`` returns a zero-argument ``run`` that computes the
meta-loss and its exact second-order gradient with respect to the model's initial parameters and
returns ``(loss, {name: gradient})`` in ``model.named_parameters()`` order. Every library runs
the same inner loop (``k`` plain SGD steps of rate ``workload.lr`` on the support set, mean
cross-entropy, no gradient clipping) and the same outer loss (the mean over tasks of the query
loss), so the gradients must agree up to float rounding.

Libraries and options:

- ``"fmaml"``: :class:`fmaml.MAML`; ``policy`` (``"store_all"``, ``"sqrt"``, ``"binomial"``,
  ``"auto"``), ``batching`` (``"auto"``, ``"vmap"``, ``"loop"``), ``task_chunk`` (each left out
  when None: the defaults), ``route`` (``"meta_grad"``, ``"grad"``, ``"backward"``).
- ``"torch.func"``: the plain unroll, ``torch.func.grad`` over a Python loop of
  ``torch.func.grad`` steps; ``batching="vmap"`` (``vmap`` over tasks, one ``grad``) or
  ``"loop"`` (one ``grad`` per task, accumulated).
- ``"higher"``: ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False)``, ``k``
  ``diffopt.step``, query ``loss.backward()``, task by task (gradients accumulate).
- ``"torch_maml"``: ``torch_maml.GradientCheckpointMAML`` with ``IngraphGradientDescent(lr)`` (no
  clipping) and ``checkpoint_steps`` (default ``ceil(sqrt(k))``), task by task.
- ``"torchopt"``: ``torchopt.MetaSGD(model, lr)``, ``k`` ``step(loss)``, ``backward``, task by task
  (the module's state is extracted before and recovered after each task).
- ``"learn2learn"``: ``learn2learn.algorithms.MAML(model, lr)``, ``clone``/``adapt``, task by task.

:func:`available` says whether a library imports.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, grad, grad_and_value, vmap

import fmaml
from benchmarks._workloads import Workload, loss_fn

__all__ = ["LIBRARIES", "available", "make", "relative_error"]

Grads = dict[str, torch.Tensor]
Run = Callable[[], tuple[torch.Tensor, Grads]]

#: The importable module behind each library name.
MODULES = {
    "fmaml": "fmaml",
    "torch.func": "torch.func",
    "higher": "higher",
    "torch_maml": "torch_maml",
    "torchopt": "torchopt",
    "learn2learn": "learn2learn",
}


def available(library: str) -> bool:
    """Whether ``library`` imports here."""
    try:
        importlib.import_module(MODULES[library])
    except Exception:  # learn2learn's import can fail in many ways (gym, torchvision, ...)
        return False
    return True


def relative_error(grads: Grads, reference: Grads) -> float:
    """``||g - ref|| / ||ref||`` over all parameters (float64)."""
    num = sum(float(((grads[n].double() - r.double()) ** 2).sum()) for n, r in reference.items())
    den = sum(float((r.double() ** 2).sum()) for r in reference.values())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _leaf_grads(model: torch.nn.Module) -> Grads:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------
# fmaml and the plain torch.func unroll


def fmaml_run(
    wl: Workload,
    policy: str | None = None,
    batching: str | None = None,
    task_chunk: int | None = None,
    route: str = "meta_grad",
) -> Run:
    """fmaml's meta-gradient; options left None are not passed (``fmaml.MAML``'s defaults).

    ``route``: ``"meta_grad"`` (:meth:`fmaml.MAML.meta_grad`), ``"grad"``
    (``torch.func.grad(maml.unrolled_loss)`` on ``fmaml.params(model)``) or ``"backward"``
    (``maml.unrolled_loss(dict(model.named_parameters()), ...).backward()``). The returned
    ``run`` records what fmaml chose (batching, snapshots, step evaluations per step) in
    ``run.choice`` after each call.
    """
    options = {"checkpoint": policy, "batching": batching, "task_chunk": task_chunk}
    maml = fmaml.MAML(
        wl.model,
        loss_fn,
        inner_lr=wl.lr,
        **{name: value for name, value in options.items() if value is not None},
    )
    params = fmaml.params(wl.model)
    named = dict(wl.model.named_parameters())

    def call() -> tuple[torch.Tensor, Grads]:
        if route == "meta_grad":
            return maml.meta_grad(params, wl.tasks, wl.k)
        if route == "grad":
            grads, loss = grad_and_value(maml.unrolled_loss)(params, wl.tasks, wl.k)
            return loss, grads
        if route != "backward":
            raise ValueError(f"fmaml: route must be meta_grad, grad or backward, got {route!r}")
        wl.model.zero_grad(set_to_none=True)
        loss = maml.unrolled_loss(named, wl.tasks, wl.k)
        loss.backward()
        return loss.detach(), _leaf_grads(wl.model)

    def run() -> tuple[torch.Tensor, Grads]:
        with fmaml.record_scan() as stats:
            out = call()
        run.choice = describe_choice(stats, wl.k)
        return out

    run.choice = {}
    return run


def describe_choice(stats: fmaml.ScanStats, k: int) -> dict[str, str]:
    """What fmaml ran: its batching, snapshots ("all graphs" when every graph was kept) and
    step evaluations per inner step (with or without a graph, forward and backward)."""
    out: dict[str, str] = {}
    if stats.batching:
        run = stats.batching[0]
        out["batching"] = run.mode + (f" chunks of {run.chunk}" if run.chunk else "")
    if stats.scans:
        scan = stats.scans[0]
        if scan.plan is None:
            out["snapshots"], out["evals_per_step"] = "all graphs", "1.00"
        else:
            evals = 2 * k + scan.plan.evaluations - (k - 1)
            out["snapshots"], out["evals_per_step"] = str(scan.plan.snapshots), f"{evals / k:.2f}"
    return out


def torch_func_run(wl: Workload, batching: str = "loop") -> Run:
    model, lr, k, n_tasks = wl.model, wl.lr, wl.k, wl.n_tasks
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(p: Grads, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    def task_loss(p: Grads, xs, ys, xq, yq) -> torch.Tensor:
        for _ in range(k):
            g = grad(loss)(p, xs, ys)
            p = {n: p[n] - lr * g[n] for n in p}
        return loss(p, xq, yq)

    (xs, ys), (xq, yq) = wl.tasks
    if batching == "vmap":

        def meta_loss(p: Grads) -> torch.Tensor:
            return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq).mean()

        def run() -> tuple[torch.Tensor, Grads]:
            g, value = grad_and_value(meta_loss)(params)
            return value, g

        return run
    if batching != "loop":
        raise ValueError(f"torch.func: batching must be 'vmap' or 'loop', got {batching!r}")

    def run_loop() -> tuple[torch.Tensor, Grads]:
        total, total_g = None, None
        for t in range(n_tasks):
            g, value = grad_and_value(task_loss)(params, xs[t], ys[t], xq[t], yq[t])
            g = {n: v / n_tasks for n, v in g.items()}
            value = value / n_tasks
            total = value if total is None else total + value
            total_g = g if total_g is None else {n: total_g[n] + g[n] for n in g}
        return total, total_g

    return run_loop


# --------------------------------------------------------------------------------------------
# the module-based peers: task by task, loss.backward() accumulates into .grad


def higher_run(wl: Workload) -> Run:
    import higher

    model, k, n_tasks = wl.model, wl.k, wl.n_tasks
    opt = torch.optim.SGD(model.parameters(), lr=wl.lr)

    def run() -> tuple[torch.Tensor, Grads]:
        model.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for t in range(n_tasks):
            (xs, ys), (xq, yq) = wl.task(t)
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(k):
                    diffopt.step(loss_fn(fmodel(xs), ys))
                loss = loss_fn(fmodel(xq), yq) / n_tasks
                loss.backward()
            total = total + loss.detach().cpu()
        return total, _leaf_grads(model)

    return run


def torch_maml_run(wl: Workload, checkpoint_steps: int | None = None) -> Run:
    import torch_maml

    model, k, n_tasks = wl.model, wl.k, wl.n_tasks
    steps = checkpoint_steps if checkpoint_steps is not None else math.isqrt(k - 1) + 1

    def compute_loss(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        return loss_fn(net(batch[0]), batch[1])

    # IngraphGradientDescent: w - lr * grad; max_grad_grad_norm=None (no clipping) by default.
    maml = torch_maml.GradientCheckpointMAML(
        model,
        compute_loss,
        optimizer=torch_maml.IngraphGradientDescent(learning_rate=wl.lr),
        checkpoint_steps=steps,
    )

    def run() -> tuple[torch.Tensor, Grads]:
        model.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for t in range(n_tasks):
            support, (xq, yq) = wl.task(t)
            with warnings.catch_warnings():  # torch.utils.checkpoint's use_reentrant warning
                warnings.simplefilter("ignore", UserWarning)
                updated, _, _ = maml([support] * k)
                loss = loss_fn(updated(xq), yq) / n_tasks
                loss.backward()
            total = total + loss.detach().cpu()
        return total, _leaf_grads(model)

    return run


def torchopt_run(wl: Workload) -> Run:
    import torchopt

    model, k, n_tasks = wl.model, wl.k, wl.n_tasks
    inner = torchopt.MetaSGD(model, lr=wl.lr)

    def run() -> tuple[torch.Tensor, Grads]:
        model.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for t in range(n_tasks):
            (xs, ys), (xq, yq) = wl.task(t)
            net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
            opt_state = torchopt.extract_state_dict(inner, by="reference")
            for _ in range(k):
                inner.step(loss_fn(model(xs), ys))
            loss = loss_fn(model(xq), yq) / n_tasks
            loss.backward()
            total = total + loss.detach().cpu()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner, opt_state)
        return total, _leaf_grads(model)

    return run


def learn2learn_run(wl: Workload) -> Run:
    import learn2learn as l2l

    model, k, n_tasks = wl.model, wl.k, wl.n_tasks
    maml = l2l.algorithms.MAML(model, lr=wl.lr, first_order=False)

    def run() -> tuple[torch.Tensor, Grads]:
        model.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for t in range(n_tasks):
            (xs, ys), (xq, yq) = wl.task(t)
            learner = maml.clone()
            for _ in range(k):
                learner.adapt(loss_fn(learner(xs), ys))
            loss = loss_fn(learner(xq), yq) / n_tasks
            loss.backward()
            total = total + loss.detach().cpu()
        return total, _leaf_grads(model)

    return run


LIBRARIES: dict[str, Callable[..., Run]] = {
    "fmaml": fmaml_run,
    "torch.func": torch_func_run,
    "higher": higher_run,
    "torch_maml": torch_maml_run,
    "torchopt": torchopt_run,
    "learn2learn": learn2learn_run,
}


def make(library: str, workload: Workload, **options: Any) -> Run:
    """The meta-gradient computation of ``library`` on ``workload`` (see the module docstring)."""
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; expected one of {sorted(LIBRARIES)}")
    return LIBRARIES[library](workload, **options)
