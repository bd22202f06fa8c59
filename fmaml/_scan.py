"""``fmaml.scan``: ``jax.lax.scan`` with checkpointing, as one custom autograd Function.

The forward pass runs the steps without any graph and keeps only the carry snapshots the policy
asks for. The backward pass replays the policy's plan (``fmaml._schedule``): it restores
snapshots, recomputes steps without a graph, and pulls the cotangent back through one step at a
time with ``torch.func.vjp``, so at most one step's graph is alive.

When a further derivative will be taken of the gradient (``jacrev(grad(...))``,
``autograd.grad(..., create_graph=True)``), the backward instead differentiates a full
recomputation from the saved inputs with a graph: exact to any order, with the memory of
``store_all``. Where no further derivative is expected but the gradient is still recorded (every
``torch.func.grad`` records), the gradient carries a guard that raises if it is differentiated.

Forward mode (``fmaml._forward``): alone, the scan is a loop of dual steps; the Function's
``jvp`` rule carries the tangents step by step; and under a Jvp level the backward runs on dual
tensors, the snapshots re-taken with their tangents (forward over reverse).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._C._functorch import (
    TransformType,
    get_interpreter_stack,
    get_unwrapped,
    is_functorch_wrapped_tensor,
)
from torch._functorch.pyfunctorch import coerce_cinterpreter

from fmaml import _compile, _compiled_pieces, _forward
from fmaml import _schedule as sch
from fmaml._autodiff import transforms_active, vjp_plain
from fmaml._footprint import batch_factor, measured, sampled_graph_bytes
from fmaml._policy import Auto, Binomial, Policy, resolve_policy
from fmaml._rng import RngState, cuda_devices, preserve_rng
from fmaml._tree import Spec, describe_leaf, flatten, leaf_paths, tree_map, unflatten

__all__ = ["ScanChoice", "ScanStats", "record_scan", "scan"]

Leaves = list[Any]


@dataclass(frozen=True)
class WholeLoop(Binomial):
    """The policy of the length-1 scan that runs a compiled ``store_all`` loop as one step
    (:func:`_whole`): one snapshot, the initial carry. ``record_scan`` shows it for the loop."""

    snapshots: int | None = 1


_WHOLE = WholeLoop()


# --------------------------------------------------------------------------------------------
# statistics (for users choosing a policy, and for tests that must be able to fail)


@dataclass
class ScanStats:
    """What the checkpointed scans run inside :func:`record_scan` did.

    Attributes:
        forward_evaluations: steps evaluated without a graph in forward passes.
        recomputations: steps evaluated again without a graph in backward passes.
        graph_evaluations: steps evaluated with a graph (one per step and backward pass).
        tangent_evaluations: steps evaluated with tangents by forward-mode AD (``jvp``,
            ``jacfwd``; see ``fmaml._forward``), which stores nothing for them.
        max_live_snapshots: most carries held at once: the snapshots (the initial carry counts
            as one) plus the working carry when it is not itself a snapshot.
        max_held_bytes: most bytes of carries the scans held beyond their inputs (snapshots and
            the working carry), physical (vmap batches included).
        sample_evaluations: steps evaluated once on a sample to measure their graph
            (:class:`fmaml.Auto` under ``torch.func`` transforms).
        plans: the checkpointing plans that ran.
        scans: one :class:`ScanChoice` per scan: its length, policy, what it measured and the
            plan it chose (``None`` when it kept every step's graph).
        batching: how each call of a :class:`fmaml.MAML` method ran its tasks (loop, vmap,
            chunks of vmap; ``fmaml._batching.Batching``), in call order.
    """

    forward_evaluations: int = 0
    recomputations: int = 0
    graph_evaluations: int = 0
    tangent_evaluations: int = 0
    max_live_snapshots: int = 0
    max_held_bytes: int = 0
    sample_evaluations: int = 0
    plans: list[sch.Plan] = field(default_factory=list)
    scans: list[ScanChoice] = field(default_factory=list)
    batching: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class ScanChoice:
    """What one scan decided: ``plan`` is None when it kept every step's graph.

    ``carry_bytes`` and ``graph_bytes`` are physical (vmap batches included); ``graph_bytes`` is
    the measured graph of one step, or None where the policy did not measure it.
    """

    length: int
    policy: Policy
    plan: sch.Plan | None
    carry_bytes: int | None
    graph_bytes: int | None

    @property
    def keeps_graphs(self) -> bool:
        return self.plan is None


_RECORDERS: list[ScanStats] = []


@contextlib.contextmanager
def record_scan() -> Iterator[ScanStats]:
    """Count the step evaluations and the snapshot memory of the scans run inside the block.

    Example:
        >>> with fmaml.record_scan() as stats:  # doctest: +SKIP
        ...     torch.func.grad(loss)(params)
        >>> stats.recomputations, stats.max_held_bytes  # doctest: +SKIP
    """
    stats = ScanStats()
    _RECORDERS.append(stats)
    try:
        yield stats
    finally:
        # by identity: ScanStats compares by value, and nested recorders are often equal
        del _RECORDERS[next(k for k, s in enumerate(_RECORDERS) if s is stats)]


def _choice(
    call: _Call,
    policy: Policy,
    plan: sch.Plan | None,
    carry: Leaves | None = None,
    graph_bytes: int | None = None,
) -> None:
    if _RECORDERS:
        carry_bytes = None if carry is None else _carry_bytes(carry)
        choice = ScanChoice(call.length, policy, plan, carry_bytes, graph_bytes)
        for stats in _RECORDERS:
            stats.scans.append(choice)


def record_batching(choice: Any) -> None:
    """Record how a MAML call batched its tasks (when recording)."""
    for stats in _RECORDERS:
        stats.batching.append(choice)


def _count(attr: str, n: int = 1) -> None:
    for stats in _RECORDERS:
        setattr(stats, attr, getattr(stats, attr) + n)


class _Held:
    """The carries a checkpointed scan holds (its snapshots and the working carry), for
    :func:`record_scan`: the live count and the bytes beyond the scan's inputs, kept up to date
    at each change in time proportional to one carry, never to the snapshots held."""

    def __init__(self, stored: dict[int, Leaves], inputs: Sequence[torch.Tensor]) -> None:
        self.skip = {id(t) for t in inputs}
        self.refs: dict[int, int] = {}  # tensor id -> how many snapshots hold it
        self.snapshots: dict[int, int] = {}  # id of a snapshot's leaf list -> times stored
        self.count = 0  # snapshots held
        self.bytes = 0
        for leaves in stored.values():
            self.add(leaves)

    def add(self, leaves: Leaves) -> None:
        self.snapshots[id(leaves)] = self.snapshots.get(id(leaves), 0) + 1
        self.count += 1
        for t in leaves:
            if id(t) not in self.skip:
                if id(t) not in self.refs:
                    self.bytes += _nbytes(t)
                self.refs[id(t)] = self.refs.get(id(t), 0) + 1

    def remove(self, leaves: Leaves) -> None:
        self.snapshots[id(leaves)] -= 1
        self.count -= 1
        if not self.snapshots[id(leaves)]:
            del self.snapshots[id(leaves)]
        for t in leaves:
            if id(t) in self.refs:
                self.refs[id(t)] -= 1
                if not self.refs[id(t)]:
                    del self.refs[id(t)]
                    self.bytes -= _nbytes(t)

    def observe(self, current: Leaves | None) -> None:
        """Record the peak with ``current`` as the working carry."""
        live, held = self.count, self.bytes
        if current is not None and id(current) not in self.snapshots:
            live += 1
            new = {id(t): t for t in current if id(t) not in self.skip and id(t) not in self.refs}
            held += sum(_nbytes(t) for t in new.values())
        for stats in _RECORDERS:
            stats.max_live_snapshots = max(stats.max_live_snapshots, live)
            stats.max_held_bytes = max(stats.max_held_bytes, held)


# --------------------------------------------------------------------------------------------
# nesting: a checkpointed scan inside the step of another scan's backward pass

_NESTING = threading.local()


@contextlib.contextmanager
def _pulling_back() -> Iterator[None]:
    """Mark the block as a scan's ``torch.func.vjp`` of its steps.

    PyTorch 2.x cannot run a custom Function that calls ``torch.func.vjp`` in its backward when
    that backward is itself reached from ``torch.func.vjp`` inside another custom Function's
    backward under ``torch.func.grad`` (an internal assert, "escaped?"). A scan nested in the step
    of a checkpointed scan therefore runs as a plain loop (``store_all``) while the outer scan pulls
    back through that step: exact, with the inner graph alive for that one outer step only.
    """
    _NESTING.depth = getattr(_NESTING, "depth", 0) + 1
    try:
        yield
    finally:
        _NESTING.depth -= 1


def _nested() -> bool:
    return getattr(_NESTING, "depth", 0) > 0


# --------------------------------------------------------------------------------------------
# tensors seen through torch.func wrappers


def _base(t: torch.Tensor) -> torch.Tensor:
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def _tracked(t: Any) -> bool:
    """Whether any autograd level (a ``torch.func`` transform or plain autograd) tracks ``t``."""
    if not isinstance(t, torch.Tensor):
        return False
    while True:
        if t.requires_grad:
            return True
        if not is_functorch_wrapped_tensor(t):
            return False
        t = get_unwrapped(t)


def _nbytes(t: torch.Tensor) -> int:
    base = _base(t)
    return base.numel() * base.element_size()


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


# --------------------------------------------------------------------------------------------
# the call: f and its arguments, validated once


@dataclass(frozen=True)
class _Call:
    f: Callable[..., Any]
    length: int
    init_spec: Spec
    init: Any  # the initial carry as given, for the paths in error messages
    xs_spec: Spec | None
    consts_spec: Spec | None
    n_init: int
    n_xs: int
    n_consts: int
    compiled: _compile.Compile | None = None

    def step(self, index: int, carry: Leaves, xs_t: Leaves, consts: Leaves) -> tuple[Leaves, Any]:
        """One step on leaves; returns the new carry leaves and the raw ``y`` pytree."""
        consts_tree = self.consts_tree(consts)
        leaves, y, _ = self.step_tree(index, unflatten(self.init_spec, carry), xs_t, consts_tree)
        return leaves, y

    def consts_tree(self, consts: Leaves) -> Any:
        """The ``consts`` pytree ``f`` reads (None when the scan has none)."""
        return None if self.consts_spec is None else unflatten(self.consts_spec, consts)

    def step_tree(
        self, index: int, carry_tree: Any, xs_t: Leaves, consts_tree: Any
    ) -> tuple[Leaves, Any, Any]:
        """:meth:`step` from the carry and ``consts`` as pytrees: ``(new carry leaves, y, new
        carry pytree)``; a loop passes the new carry pytree to the next step as it is."""
        x = unflatten(self.xs_spec, xs_t) if self.xs_spec is not None else None
        if self.consts_spec is None:
            out = self.f(carry_tree, x)
        else:
            out = self.f(carry_tree, x, consts_tree)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(
                f"fmaml.scan: `f` must return a pair (carry, y), got {type(out).__name__}"
                f"{f' of length {len(out)}' if isinstance(out, tuple) else ''} at step {index}. "
                "Return `(new_carry, None)` if the step has no per-step output."
            )
        new_carry, y = out
        leaves, spec = flatten(new_carry)
        if spec != self.init_spec:
            raise TypeError(
                f"fmaml.scan: `f` returned a carry with structure {spec} at step {index}, but "
                f"`init` has structure {self.init_spec}. The carry must keep its structure."
            )
        return leaves, y, new_carry

    def check_carry(self, init: Leaves, new: Leaves) -> None:
        for j, (a, b) in enumerate(zip(init, new, strict=True)):
            same = isinstance(b, torch.Tensor) and (
                a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            )
            if not same:
                self._bad_carry(leaf_paths(self.init, "carry")[j], a, b)

    @staticmethod
    def _bad_carry(path: str, a: torch.Tensor, b: Any) -> None:
        if not isinstance(b, torch.Tensor):
            raise TypeError(
                f"fmaml.scan: `f` returned a non-tensor carry leaf {path} = "
                f"{describe_leaf(b)}; every carry leaf must be a tensor (use None for an "
                "empty slot)."
            )
        raise TypeError(
            f"fmaml.scan: the carry component {path} has type {describe_leaf(a)} on "
            f"{a.device} in `init` but `f` returned {describe_leaf(b)} on {b.device}. "
            "The carry must keep its shapes, dtypes and devices: cast inside `f`."
        )

    def x_at(self, xs: Leaves, i: int) -> Leaves:
        return [leaf[i] for leaf in xs]

    def _compile_key(self) -> tuple:
        """What the compiled pieces of a scan are keyed by (``fmaml._compiled_pieces``)."""
        code = _compiled_pieces._code(self.f)
        return (code, self.length, self.init_spec, self.xs_spec, self.consts_spec)

    def no_graph_step(
        self,
        index: int,
        carry: Leaves,
        x: Leaves,
        consts: Leaves,
        eager: Callable[[], tuple[Leaves, Any]] | None = None,
    ) -> tuple[Leaves, Any]:
        """:meth:`step` where no graph is kept (forward sweep, recomputation): compiled if asked
        (``eager``: the fallback, by default :meth:`step`)."""
        if eager is None:
            eager = functools.partial(self.step, index, carry, x, consts)
        if self.compiled is None:
            return eager()
        return _compiled_pieces.step(self, carry, x, consts, eager)

    def call_step(self, i: int, carry: Leaves, xs: Leaves, consts: Leaves) -> tuple[Leaves, Leaves]:
        """A step on leaves that also flattens ``y``."""
        new, y = self.step(i, carry, self.x_at(xs, i), consts)
        return new, flatten(y)[0]


def _check_leaves(tree: Any, name: str) -> tuple[Leaves, Spec]:
    leaves, spec = flatten(tree)
    if all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        return leaves, spec
    for path, leaf in zip(leaf_paths(tree, name), leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"fmaml.scan: every leaf of `{name}` must be a tensor, but {path} is "
                f"{describe_leaf(leaf)}. Convert it with torch.as_tensor, or close over it in `f` "
                "if it is a constant."
            )
    return leaves, spec


def _build_call(
    f: Callable[..., Any],
    init: Any,
    xs: Any,
    length: int | None,
    consts: Any,
    compiled: _compile.Compile | None = None,
) -> tuple[_Call, Leaves, Leaves, Leaves]:
    if not callable(f):
        raise TypeError(f"fmaml.scan: `f` must be callable, got {type(f).__name__}.")
    init_leaves, init_spec = _check_leaves(init, "init")
    xs_leaves, xs_spec = ([], None) if xs is None else _check_leaves(xs, "xs")
    consts_leaves, consts_spec = ([], None) if consts is None else _check_leaves(consts, "consts")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
        raise TypeError(f"fmaml.scan: `length` must be an int or None, got {length!r}.")
    if length is not None and length < 0:
        raise ValueError(f"fmaml.scan: `length` must be >= 0, got {length}.")
    if xs_spec is not None:
        paths = leaf_paths(xs, "xs")
        for path, leaf in zip(paths, xs_leaves, strict=True):
            if leaf.dim() == 0:
                raise ValueError(
                    f"fmaml.scan: {path} is a 0-d tensor; `xs` leaves are sliced along their first "
                    "dimension, so each needs a leading dimension of size `length`."
                )
        sizes = {path: leaf.shape[0] for path, leaf in zip(paths, xs_leaves, strict=True)}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{p}: {n}" for p, n in sizes.items())
            raise ValueError(
                f"fmaml.scan: the leaves of `xs` must share their leading size, got {listed}."
            )
        if sizes:
            leading = next(iter(sizes.values()))
            if length is not None and length != leading:
                raise ValueError(
                    f"fmaml.scan: `length`={length} disagrees with the leading size {leading} of "
                    "the leaves of `xs`. Drop `length` or slice `xs`."
                )
            length = leading
    if length is None:
        raise ValueError(
            "fmaml.scan: `length` is required when `xs` is None (or has no leaves): pass "
            "length=number_of_steps."
        )
    call = _Call(
        f=f,
        length=length,
        init_spec=init_spec,
        init=init,
        xs_spec=xs_spec,
        consts_spec=consts_spec,
        n_init=len(init_leaves),
        n_xs=len(xs_leaves),
        n_consts=len(consts_leaves),
        compiled=compiled,
    )
    return call, init_leaves, xs_leaves, consts_leaves


# --------------------------------------------------------------------------------------------
# the public function


def scan(
    f: Callable[..., tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    *,
    length: int | None = None,
    checkpoint: str | Policy = "auto",
    consts: Any = None,
    compile: bool | str | dict | _compile.Compile = False,
) -> tuple[Any, Any]:
    """Scan ``f`` over the leading axis of ``xs``, carrying state, with checkpointed gradients.

    As ``jax.lax.scan``: ``(c -> a -> (c, b)) -> c -> [a] -> (c, [b])``, defined by::

        def scan(f, init, xs, length=None):
            carry, ys = init, []
            for i in range(length):
                x = tree_map(lambda leaf: leaf[i], xs) if xs is not None else None
                carry, y = f(carry, x)
                ys.append(y)
            return carry, tree_map(lambda *leaves: torch.stack(leaves), *ys)

    New here: ``checkpoint`` picks how the backward pass trades memory for recomputation, and
    ``consts`` passes differentiable constants of the step explicitly.

    Args:
        f: the step, ``f(carry, x) -> (carry, y)``, or ``f(carry, x, consts)`` when ``consts`` is
            given. ``carry``, ``x`` and ``y`` are pytrees of tensors (optree; ``None`` is an empty
            subtree). The returned carry must match ``init`` in structure, shapes, dtypes and
            devices. ``f`` must be a pure function of its arguments: a tensor it closes over that
            is being differentiated raises (pass it in ``consts`` or the carry instead).
        init: the initial carry, a pytree of tensors (integer leaves are carried, not
            differentiated).
        xs: a pytree of tensors of shape ``(length, ...)`` sliced along dimension 0, or ``None``.
        length: the number of steps; required when ``xs`` is ``None``.
        checkpoint: ``"auto"`` (default), ``"store_all"``, ``"sqrt"``, ``"binomial"`` or a policy
            object (:class:`fmaml.Auto`, :class:`fmaml.StoreAll`, :class:`fmaml.Uniform`,
            :class:`fmaml.Binomial`).
        consts: differentiable constants of the step (a learning rate, per-parameter rates), a
            pytree of tensors passed to ``f`` unchanged at every step; their gradient is exact.
        compile: compile the pieces the scan runs many times with ``torch.compile``: the step
            without a graph (forward sweep, recomputation) and the step with its pull-back
            (first-order backward pass); with ``store_all``, the whole loop as one piece.
            ``True``, ``"auto"`` (where measured to win: small operators), a dict of
            ``torch.compile`` options (``mode``, ``dynamic``, ``backend``, ...) or
            :class:`fmaml.Compile`. Off by default. Results equal the eager scan's to
            round-off; one compilation per structure (shapes, dtypes, transforms); a piece that
            fails to compile runs eagerly after one warning. See ``docs/compile.md``.

    Returns:
        ``(carry, ys)``: the final carry and the per-step outputs stacked along a new dimension 0
        (shape ``(length, ...)``).

    Example:
        >>> w = torch.tensor(0.5, requires_grad=True)
        >>> carry, ys = fmaml.scan(lambda c, x: (c * x, c), w, torch.arange(1.0, 4.0))
        >>> carry, ys
        (tensor(3., grad_fn=...), tensor([0.5000, 0.5000, 1.0000], grad_fn=...))

    With ``length`` 0, ``f`` is evaluated once without a graph (on zeros of the ``xs`` slice
    shapes) to learn the structure of ``ys``, which come back with a leading size 0; the carry is
    ``init`` itself.

    Forward mode works under every policy (``jvp``, ``jacfwd``, ``hessian``, ``jvp(grad(...))``;
    ``fmaml._forward``): alone it stores nothing, whatever the policy; over a reverse pass it keeps
    the policy's snapshots, with their tangents.

    Inside a function that ``torch.compile`` traces, a scan whose policy keeps every graph
    (``store_all``) traces as the plain loop; a checkpointed scan breaks the graph.

    Random ops in ``f`` replay exactly on recomputation when they draw from the global CPU/CUDA
    generators (dropout, ``torch.rand``): the scan saves and restores their states. A private
    ``torch.Generator`` object used inside ``f`` is *not* replayed; pass random numbers in
    through ``xs`` instead.

    References: Griewank and Walther (2000), Algorithm 799: revolve.
    """
    policy = resolve_policy(checkpoint)
    compiled = _compile.resolve_compile(compile, "fmaml.scan")
    if torch.compiler.is_compiling() and (length is not None or xs is not None):
        # traced by an enclosing torch.compile: the plain loop where every graph is kept
        n = length if length is not None else _compiled_pieces.traced_length(xs)
        auto = isinstance(policy, Auto) and _compile.keeps_graphs()
        if policy.stores_all(n) or auto:
            return _compiled_pieces.traced_loop(f, init, xs, n, consts)
    call, init_leaves, xs_leaves, consts_leaves = _build_call(f, init, xs, length, consts, compiled)
    if call.length == 0:
        return _empty_scan(call, init, init_leaves, xs_leaves, consts_leaves)
    if _forward.forward_only([*init_leaves, *xs_leaves, *consts_leaves]):
        return _forward.forward_scan(call, init_leaves, xs_leaves, consts_leaves)
    if policy.stores_all(call.length) or _nested():
        _choice(call, policy, None)
        return _store_all(call, init_leaves, xs_leaves, consts_leaves)
    _forward.refuse_plain_duals([*init_leaves, *xs_leaves, *consts_leaves])
    if isinstance(policy, Auto):
        return _auto(call, policy, init_leaves, xs_leaves, consts_leaves)
    return _checkpointed(call, policy, init_leaves, xs_leaves, consts_leaves)


def _stack_ys(call: _Call, ys: list[Leaves], spec: Spec) -> Any:
    if not ys or not ys[0]:
        return unflatten(spec, [])
    return unflatten(spec, [torch.stack(column) for column in zip(*ys, strict=True)])


def _y_spec(y: Any, index: int, expected: Spec | None) -> tuple[Leaves, Spec]:
    leaves, spec = flatten(y)
    if expected is not None and spec != expected:
        raise TypeError(
            f"fmaml.scan: `f` returned y with structure {spec} at step {index}, but {expected} "
            "at step 0. Every step must return the same structure."
        )
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"fmaml.scan: every leaf of `y` must be a tensor, got {describe_leaf(leaf)} at "
                f"step {index}."
            )
    return leaves, spec


def _empty_scan(call: _Call, init: Any, init_leaves: Leaves, xs: Leaves, consts: Leaves) -> Any:
    with torch.no_grad():
        x0 = [leaf.new_zeros(leaf.shape[1:]) for leaf in xs]
        new, y = call.step(0, [t.detach() for t in init_leaves], x0, consts)
        call.check_carry(init_leaves, new)
        leaves, spec = _y_spec(y, 0, None)
    return init, unflatten(spec, [leaf.new_empty((0, *leaf.shape)) for leaf in leaves])


def _store_all(
    call: _Call,
    carry: Leaves,
    xs: Leaves,
    consts: Leaves,
    first: tuple[Leaves, Any] | None = None,
) -> tuple[Any, Any]:
    """The plain loop: every step's graph is kept (``first``: step 0's result, already run).
    With ``compile=``, the whole loop as the one step of a checkpointed scan (:func:`_whole`),
    unless ``"auto"`` declines it (measured on its first call, which runs the plain loop)."""

    def plain() -> tuple[Any, Any]:
        final, ys = _unroll(call, carry, xs, consts, first)
        _count("forward_evaluations", call.length)
        _count("graph_evaluations", call.length)
        return unflatten(call.init_spec, final), ys

    if call.compiled is None or _nested() or _compile.suppressed():
        return plain()
    templates = _compiled_pieces.templates(call)
    if templates is None:
        return plain()
    key = ("store_all", call._compile_key())
    declined, out = _compile.auto_declines(call.compiled, key, [*carry, *xs, *consts], plain)
    if declined:
        return out
    return _whole(call, templates, carry, xs, consts)


def _whole(
    call: _Call, templates: tuple, carry: Leaves, xs: Leaves, consts: Leaves
) -> tuple[Any, Any]:
    """``store_all``, compiled: the whole loop as the one step of a checkpointed scan of length 1.

    Its compiled pieces are then the loop without a graph (the forward pass) and the loop with
    its vjp (the backward pass), one graph each, under every transform a checkpointed scan
    supports; the loop runs once more, inside the vjp, where its graph lives as ``store_all``'s
    would. (AOTAutograd's own backward of the loop measured slower than its vjp compiled whole.)
    ``record_scan`` sees a scan of length 1. A step that closes over a differentiated tensor
    (which ``store_all`` allows) runs as the plain loop, eagerly.
    """

    def loop(c: Any, x: Any, k: tuple[Leaves, Leaves]) -> tuple[Any, Any]:
        xs_k, consts_k = k
        if torch.compiler.is_compiling():
            return _compiled_pieces.traced_unroll(call, templates, c, xs_k, consts_k)
        final, ys = _unroll(call, flatten(c)[0], xs_k, consts_k)
        return unflatten(call.init_spec, final), ys

    init = unflatten(call.init_spec, carry)
    rng = RngState.capture(cuda_devices([*carry, *xs, *consts]))
    try:
        final, ys = scan(
            loop, init, length=1, checkpoint=_WHOLE, consts=(xs, consts), compile=call.compiled
        )
    except _ClosureError:  # store_all differentiates closures: the plain loop, eagerly
        rng.restore()
        final_leaves, ys = _unroll(call, carry, xs, consts)
        _count("forward_evaluations", call.length)
        _count("graph_evaluations", call.length)
        return unflatten(call.init_spec, final_leaves), ys
    return final, tree_map(lambda leaf: leaf[0], ys)


def _unroll(
    call: _Call,
    carry: Leaves,
    xs: Leaves,
    consts: Leaves,
    first: tuple[Leaves, Any] | None = None,
) -> tuple[Leaves, Any]:
    ys: list[Leaves] = []
    spec = None
    consts_tree = call.consts_tree(consts)  # the same at every step
    tree = None  # the carry as the last step returned it
    for i in range(call.length):
        if i == 0 and first is not None:
            new, y = first
        else:
            if tree is None:
                tree = unflatten(call.init_spec, carry)
            new, y, tree = call.step_tree(i, tree, call.x_at(xs, i), consts_tree)
        if i == 0:
            call.check_carry(carry, new)
        leaves, spec = _y_spec(y, i, spec)
        carry = new
        ys.append(leaves)
    return carry, _stack_ys(call, ys, spec)


class _ClosureError(ValueError):
    """``f`` closes over a tensor that is being differentiated (a checkpointed scan refuses)."""


_CLOSURE = (
    "fmaml.scan: `f` closes over a tensor that is being differentiated (it requires grad, "
    "or an enclosing torch.func transform tracks it, in reverse or forward mode): its "
    "derivative through a checkpointed scan would be lost. Pass it explicitly, as `consts=` "
    "(f(carry, x, consts)) or as part of the carry, or use checkpoint='store_all'."
)


def _check_no_closure(c1: Leaves, y0: Leaves) -> None:
    if any(_tracked(t) or _forward.has_tangent(t) for t in (*c1, *y0)):
        raise _ClosureError(_CLOSURE)


def _auto(call: _Call, policy: Auto, init: Leaves, xs: Leaves, consts: Leaves) -> tuple[Any, Any]:
    """:class:`fmaml.Auto`: measure one step's graph; keep every graph if they fit the budget,
    else checkpoint with the snapshots the rest of the budget buys."""
    inputs = [*init, *xs, *consts]
    x0 = call.x_at(xs, 0)
    if policy.graph_bytes is not None:  # known: scaled by the vmap batch, nothing measured
        graph = policy.graph_bytes * max([batch_factor(t) for t in init] or [1])
        if policy.keeps_graphs(call.length, _carry_bytes(init), graph):
            _choice(call, policy, None, init, graph)
            return _store_all(call, init, xs, consts)
        return _checkpointed(call, policy, init, xs, consts, graph_bytes=graph)
    if not transforms_active():
        # Plain autograd: step 0 runs for real, its graph measured on the way. Kept if every
        # graph fits; otherwise its result, detached, starts the checkpointed scan.
        devices = cuda_devices(inputs)
        rng0 = RngState.capture(devices)
        first, graph = measured(lambda: _replaying(rng0, call.step, 0, init, x0, consts), inputs)
        call.check_carry(init, first[0])
        if policy.keeps_graphs(call.length, _carry_bytes(first[0]), graph):
            _choice(call, policy, None, first[0], graph)
            return _store_all(call, init, xs, consts, first=first)
        first = _detached_unless_closure(inputs, first)  # step 0's graph goes
        return _apply_checkpointed(call, policy, init, xs, consts, first, rng0, graph)
    # Under torch.func: measure a sample of step 0 (one element of every vmap batch, plain).
    tracked = [_tracked(t) and _differentiable(t) for t in [*init, *x0, *consts]]
    n_c, n_x = len(init), len(x0)

    def step0(*leaves: torch.Tensor) -> Any:
        c, x, k = leaves[:n_c], leaves[n_c : n_c + n_x], leaves[n_c + n_x :]
        return call.step(0, list(c), list(x), list(k))

    with preserve_rng(cuda_devices(inputs)):
        graph = sampled_graph_bytes(step0, [*init, *x0, *consts], tracked)
    _count("sample_evaluations")
    if policy.keeps_graphs(call.length, _carry_bytes(init), graph):
        _choice(call, policy, None, init, graph)
        return _store_all(call, init, xs, consts)
    return _checkpointed(call, policy, init, xs, consts, graph_bytes=graph)


def _carry_bytes(carry: Leaves) -> int:
    return sum(_nbytes(t) for t in carry if isinstance(t, torch.Tensor))


def _replaying(rng: RngState, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` from the random state ``rng`` (a step that may run twice draws the same)."""
    rng.restore()
    return fn(*args)


def _detached_unless_closure(inputs: Leaves, first: tuple[Leaves, Any]) -> tuple[Leaves, Any]:
    """Step 0's ``(carry, y)``, detached, after checking that its graph reads only ``inputs``."""
    c1, y0 = first
    y_leaves, y_spec = _y_spec(y0, 0, None)
    if _reads_foreign(inputs, [*c1, *y_leaves]):
        raise _ClosureError(_CLOSURE)
    return [t.detach() for t in c1], unflatten(y_spec, [t.detach() for t in y_leaves])


def _reads_foreign(inputs: Leaves, outputs: Leaves) -> bool:
    """Whether plain autograd's graph of ``outputs`` reaches a tensor that requires grad and is
    not (derived only from) one of ``inputs``: a closed-over tensor being differentiated."""
    stops = {(t.grad_fn, t.output_nr) for t in inputs if t.grad_fn is not None}
    own = {id(t) for t in inputs}
    todo = [(t.grad_fn, t.output_nr) for t in outputs if t.grad_fn is not None]
    seen: set = set()
    while todo:
        node, _ = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in own:
            return True
        for edge in node.next_functions:
            if edge[0] is not None and edge not in stops:
                todo.append(edge)
    return False


def _checkpointed(
    call: _Call,
    policy: Policy,
    init: Leaves,
    xs: Leaves,
    consts: Leaves,
    graph_bytes: int | None = None,
) -> tuple[Any, Any]:
    devices = cuda_devices([*init, *xs, *consts])
    rng0 = RngState.capture(devices)
    # Step 0 runs here, at the caller's level, on untracked aliases of the inputs: it validates
    # the carry, learns the structure of y, and detects closed-over tensors that a transform or
    # autograd tracks (its output would then be tracked). The Function reuses its result.
    with torch.no_grad():
        u_init = [t.detach() for t in init]
        u_x0 = [t[0].detach() for t in xs]
        u_consts = [t.detach() for t in consts]
    if call.compiled is None:
        c1, y0_tree = call.step(0, u_init, u_x0, u_consts)
    else:  # compiled without a graph; the eager fallback in the caller's grad mode (for checks)
        mode = torch.is_grad_enabled()

        def eager() -> tuple[Leaves, Any]:
            with torch.set_grad_enabled(mode):
                return call.step(0, u_init, u_x0, u_consts)

        with torch.no_grad():
            c1, y0_tree = call.no_graph_step(0, u_init, u_x0, u_consts, eager)
    call.check_carry(init, c1)
    _check_no_closure(c1, flatten(y0_tree)[0])
    return _apply_checkpointed(call, policy, init, xs, consts, (c1, y0_tree), rng0, graph_bytes)


def _apply_checkpointed(
    call: _Call,
    policy: Policy,
    init: Leaves,
    xs: Leaves,
    consts: Leaves,
    first: tuple[Leaves, Any],
    rng0: RngState,
    graph_bytes: int | None,
) -> tuple[Any, Any]:
    """The checkpointed Function, from step 0's untracked result ``first``."""
    c1, y0_tree = first
    y0, y_spec = _y_spec(y0_tree, 0, None)
    _count("forward_evaluations")
    plan = policy.plan(call.length, _carry_bytes(c1), graph_bytes)  # physical bytes
    _choice(call, policy, plan, c1, graph_bytes)
    static = _Static(call, plan, y_spec, [_differentiable(t) for t in y0], rng0, rng0.devices)
    static.retake = _forward.backward_under_forward_mode()
    out = _ScanFunction.apply(static, *init, *xs, *consts, *c1, *y0)
    carry = unflatten(call.init_spec, out[: call.n_init])
    ys = unflatten(y_spec, out[call.n_init : call.n_init + len(y0)])
    return carry, ys


# --------------------------------------------------------------------------------------------
# the autograd Function


@dataclass
class _Static:
    """Everything the Function needs that is not a tensor, shared by forward and backward."""

    call: _Call
    plan: sch.Plan
    y_spec: Spec
    y_float: list[bool]
    rng0: RngState
    devices: tuple[int, ...]
    # filled by forward: where each stored carry leaf lives ("in", i) or ("out", i)
    refs: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    rng: dict[int, RngState] = field(default_factory=dict)
    retake: bool = False  # the backward re-takes the snapshots, with tangents (fmaml._forward)

    @property
    def n_y(self) -> int:
        return len(self.y_float)

    @property
    def n_in(self) -> int:
        c = self.call
        return c.n_init + c.n_xs + c.n_consts

    def split(self, flat: Sequence[Any]) -> tuple[Leaves, Leaves, Leaves]:
        c = self.call
        a, b = c.n_init, c.n_init + c.n_xs
        return list(flat[:a]), list(flat[a:b]), list(flat[b : self.n_in])


class _ScanFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(static: _Static, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        call, plan = static.call, static.plan
        init, xs, consts = static.split(flat)
        c1 = list(flat[static.n_in : static.n_in + call.n_init])
        ys: list[Leaves] = [list(flat[static.n_in + call.n_init :])]
        stored: dict[int, Leaves] = {}
        static.rng = {0: static.rng0}
        current, index = init, 0
        for action in plan.forward:
            if isinstance(action, sch.Snapshot):
                stored[action.index] = current
                if action.index:
                    static.rng[action.index] = RngState.capture(static.devices)
            elif isinstance(action, sch.Advance):
                for i in range(action.start, action.stop):
                    if i == 0:
                        current = c1
                    else:
                        current, y = call.no_graph_step(i, current, call.x_at(xs, i), consts)
                        ys.append(_y_spec(y, i, static.y_spec)[0])
                _count("forward_evaluations", action.stop - max(action.start, 1))
                index = action.stop
            else:  # pragma: no cover - the planner guarantees it
                raise AssertionError(f"unexpected forward action {action}")
        last = call.length - 1
        assert index == last, (index, last)
        static.rng[last] = RngState.capture(static.devices)
        stored[last] = current
        if last == 0:
            final = c1
        else:
            final, y = call.no_graph_step(last, current, call.x_at(xs, last), consts)
            ys.append(_y_spec(y, last, static.y_spec)[0])
            _count("forward_evaluations")
        if static.retake:  # snapshots without tangents would be of no use to that backward
            stored.clear()
        outputs = [*final, *(torch.stack(col) for col in zip(*ys, strict=True))]
        # A carry leaf that `f` passes through unchanged (a learning rate riding in the carry) is
        # an input; autograd refuses to save an input returned as-is, so return a view of it.
        inputs = {id(t) for t in flat}
        outputs = [t.view_as(t) if id(t) in inputs else t for t in outputs]
        return tuple(outputs + _store_refs(static, flat, outputs, stored))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        static: _Static = inputs[0]
        flat, output = inputs[1:], tuple(output)
        ins = sorted({i for refs in static.refs.values() for kind, i in refs if kind == "in"})
        ins = sorted(set(range(static.n_in)) | set(ins))
        outs = sorted({i for refs in static.refs.values() for kind, i in refs if kind == "out"})
        ctx.static = static
        ctx.slots = {("in", i): k for k, i in enumerate(ins)}
        ctx.slots.update({("out", i): len(ins) + k for k, i in enumerate(outs)})
        saved = (*(flat[i] for i in ins), *(output[i] for i in outs))
        ctx.save_for_backward(*saved)
        if _forward.forward_mode():
            # the same tensors: under vmap both calls share one record of batch dimensions
            ctx.save_for_forward(*saved)
        ctx.n_outputs = len(output)
        n_main = static.call.n_init + static.n_y
        extra = output[n_main:]
        ints = [t for t in output[:n_main] if not _differentiable(t)]
        if extra or ints:
            ctx.mark_non_differentiable(*extra, *ints)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        static: _Static = ctx.static
        call = static.call
        saved = ctx.saved_tensors
        init = [saved[ctx.slots["in", i]] for i in range(call.n_init)]
        _, xs, consts = static.split([saved[ctx.slots["in", i]] for i in range(static.n_in)])
        ct_carry = list(grads[: call.n_init])
        ct_ys = list(grads[call.n_init : call.n_init + static.n_y])
        needs = list(ctx.needs_input_grad[1 : 1 + static.n_in])
        _, need_xs, need_consts = static.split(needs)
        args = _Backward(static, init, xs, consts, need_xs, need_consts, ct_carry, ct_ys)
        present = [g for g in grads if g is not None]
        _forward.refuse_plain_duals([*saved, *present])
        if _needs_graph([*saved, *present]):
            g_init, g_xs, g_consts = args.exact()
        else:
            with torch.no_grad(), _forward.explain_pytorch_bugs():
                if static.retake or _forward.forward_mode():  # snapshots with tangents
                    stored = _forward.resweep(static, init, xs, consts)
                else:
                    stored = {
                        index: [saved[ctx.slots[ref]] for ref in refs]
                        for index, refs in static.refs.items()
                    }
                g_init, g_xs, g_consts = args.checkpointed(stored)
            # Anything the current level tracks: a constant cotangent (the gradient of a sum)
            # does not, but the inputs being differentiated always do.
            anchors = [t for t in (*present, *saved) if _tracked(t)]
            if anchors and torch.is_grad_enabled():
                guard = _guard(anchors[0])
                g_init, g_xs, g_consts = (guard(g) for g in (g_init, g_xs, g_consts))
        n_rest = call.n_init + static.n_y
        return (None, *g_init, *g_xs, *g_consts, *([None] * n_rest))

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[torch.Tensor | None, ...]:
        """The forward-mode rule: the tangents of the carry and ys (``fmaml._forward``)."""
        static: _Static = ctx.static
        saved = ctx.saved_tensors
        primals = static.split([saved[ctx.slots["in", i]] for i in range(static.n_in)])
        dots = static.split(tangents[1 : 1 + static.n_in])
        out = _forward.tangents(static, primals, dots)
        extra = [saved[ctx.slots["out", i]] for i in range(len(out), ctx.n_outputs)]
        return (*out, *_forward.extra_tangents(ctx, extra))


def _store_refs(
    static: _Static, flat: Sequence[torch.Tensor], outputs: list[torch.Tensor], stored: dict
) -> list[torch.Tensor]:
    """Record where each stored carry leaf lives; return the extra outputs that hold them.

    A stored leaf that *is* an input (a carry leaf ``f`` passes through unchanged) or an output is
    referenced, not returned again: autograd refuses to save an input returned as an output.
    """
    where: dict[int, tuple[str, int]] = {id(t): ("in", i) for i, t in enumerate(flat)}
    where.update({id(t): ("out", i) for i, t in enumerate(outputs) if id(t) not in where})
    extra: list[torch.Tensor] = []
    static.refs = {}
    for index, leaves in stored.items():
        refs = []
        for leaf in leaves:
            if id(leaf) not in where:
                where[id(leaf)] = ("out", len(outputs) + len(extra))
                extra.append(leaf)
            refs.append(where[id(leaf)])
        static.refs[index] = refs
    if _RECORDERS:  # c1 is an input of the Function, not of the scan
        _Held(stored, flat[: static.n_in]).observe(None)
    for stats in _RECORDERS:
        stats.plans.append(static.plan)
    return extra


def _needs_graph(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a derivative of the gradient being computed may be taken.

    Under plain autograd that is ``create_graph=True`` (grad mode on inside backward). Under
    ``torch.func`` the innermost Grad level is the one asking; a second Grad level outside it, or
    plain autograd tracking the inputs underneath, will differentiate the result again. A Jvp
    level needs no graph: it differentiates the checkpointed backward as it runs
    (``fmaml._forward``: forward over reverse).
    """
    stack = get_interpreter_stack()
    levels = [coerce_cinterpreter(i) for i in stack or () if i.key() == TransformType.Grad]
    if not levels:
        if any(i.key() == TransformType.Jvp for i in stack or ()):
            return torch.is_grad_enabled() and any(_base(t).requires_grad for t in tensors)
        return torch.is_grad_enabled()
    # A level outside the innermost records only if grad mode was on when the next level was
    # entered (a scan's own backward enters its vjp levels under no_grad: nested scans stay cheap).
    recording = [getattr(i, "prev_grad_mode", lambda: True)() for i in levels]
    if any(recording[1:]):
        return True
    return recording[0] and any(_base(t).requires_grad for t in tensors)


class _NoGraph(torch.autograd.Function):
    """Identity whose derivative raises: marks gradients computed without a graph."""

    generate_vmap_rule = True

    @staticmethod
    def forward(who: str, anchor: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(v.clone() for v in values)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.who = inputs[0]
        if _forward.forward_mode():
            ctx.save_for_forward(*inputs[2:])

    @staticmethod
    def jvp(ctx: Any, d_who: None, d_anchor: Any, *d_values: Any) -> tuple[torch.Tensor, ...]:
        # forward over reverse differentiates such gradients as they are computed (fmaml._forward)
        values = ctx.saved_tensors
        pairs = zip(values, d_values, strict=True)
        return tuple(torch.zeros_like(v) if d is None else d for v, d in pairs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, ...]:
        raise RuntimeError(
            f"{ctx.who} without a graph is being differentiated again at the same level "
            "(torch.autograd.grad(..., create_graph=True) inside torch.func.grad?). Nest "
            "torch.func transforms instead (jacrev(grad(f))), "
            "differentiate with plain autograd and create_graph=True outside torch.func, or use "
            "checkpoint='store_all'."
        )


def _guard(
    anchor: torch.Tensor, who: str = "fmaml.scan: a gradient computed through a checkpointed scan"
) -> Callable[[Leaves], Leaves]:
    """Wrap gradients in one :class:`_NoGraph` node (the ``None`` ones stay ``None``)."""

    def apply(grads: Leaves) -> Leaves:
        where = [j for j, g in enumerate(grads) if g is not None]
        if not where:
            return list(grads)
        guarded = _NoGraph.apply(who, anchor, *(grads[j] for j in where))
        return _put(list(grads), where, guarded)

    return apply


# --------------------------------------------------------------------------------------------
# the two backward strategies


@dataclass
class _Backward:
    static: _Static
    init: Leaves
    xs: Leaves
    consts: Leaves
    need_xs: list[bool]
    need_consts: list[bool]
    ct_carry: list[torch.Tensor | None]
    ct_ys: list[torch.Tensor | None]

    def _pieces(self, carry: Leaves) -> tuple[list[int], list[int], list[int]]:
        """Which leaves of (carry, xs, consts) are differentiated: the vjp's primals."""
        dc = [j for j, t in enumerate(carry) if _differentiable(t)]
        dx = [j for j, need in enumerate(self.need_xs) if need]
        dk = [j for j, need in enumerate(self.need_consts) if need]
        return dc, dx, dk

    def _step_fn(self, index: int, carry: Leaves, x: Leaves, consts: Leaves) -> Callable:
        """The step as a function of its differentiable pieces, for ``torch.func.vjp``."""
        call = self.static.call
        dc, dx, dk = self._pieces(carry)

        def fn(c: Leaves, xd: Leaves, kd: Leaves) -> tuple[Leaves, Leaves]:
            full = _put(carry, dc, c), _put(x, dx, xd), _put(consts, dk, kd)
            new, y = call.step(index, *full)
            ys = flatten(y)[0]
            return [new[j] for j in dc], [t for t in ys if _differentiable(t)]

        primals = ([carry[j] for j in dc], [x[j] for j in dx], [consts[j] for j in dk])
        return fn, primals, dc, dx, dk

    def checkpointed(self, stored: dict[int, Leaves]) -> tuple[Leaves, Leaves, Leaves]:
        static, call = self.static, self.static.call
        n = call.length
        rng = dict(static.rng)
        current = stored.pop(n - 1)
        stored[0] = self.init
        ct_c: list[torch.Tensor | None] = list(self.ct_carry)
        g_steps: list[Leaves | None] = [None] * n
        g_consts: list[torch.Tensor | None] = [None] * call.n_consts
        held = _Held(stored, [*self.init, *self.xs, *self.consts]) if _RECORDERS else None
        with preserve_rng(static.devices):
            rng[n - 1].restore()
            for action in static.plan.backward:
                if isinstance(action, sch.StepBackward):
                    i = action.index
                    ct_c, gx, gk = self._pull_back(i, current, ct_c)
                    g_steps[i] = gx
                    g_consts = [_add(a, b) for a, b in zip(g_consts, gk, strict=True)]
                    _count("graph_evaluations")
                elif isinstance(action, sch.Advance):
                    for i in range(action.start, action.stop):
                        current, _ = call.no_graph_step(
                            i, current, call.x_at(self.xs, i), self.consts
                        )
                    _count("recomputations", action.stop - action.start)
                    if held is not None:  # the working carry may be no snapshot
                        held.observe(current)
                elif isinstance(action, sch.Restore):
                    current = stored[action.index]
                    rng[action.index].restore()
                elif isinstance(action, sch.Snapshot):
                    stored[action.index] = current
                    rng[action.index] = RngState.capture(static.devices)
                    if held is not None:
                        held.add(current)
                        held.observe(current)
                elif isinstance(action, sch.Free):
                    if held is not None:
                        held.remove(stored[action.index])
                    del stored[action.index]
        g_init = [
            None if not _differentiable(t) else _zero_if_none(g, t)
            for t, g in zip(self.init, ct_c, strict=True)
        ]
        return g_init, self._stack_xs(g_steps), g_consts

    def _pull_back(
        self, i: int, carry: Leaves, ct_c: list[torch.Tensor | None]
    ) -> tuple[list, Leaves, Leaves]:
        call = self.static.call
        x = call.x_at(self.xs, i)
        fn, primals, dc, dx, dk = self._step_fn(i, carry, x, self.consts)
        ys_d = [g for g, f in zip(self.ct_ys, self.static.y_float, strict=True) if f]
        if call.compiled is not None:  # grad mode is off here: a first-order backward pass
            g_c, g_x, g_k = _compiled_pieces.pull_back(
                call,
                carry,
                x,
                self.consts,
                (dc, dx, dk),
                [ct_c[j] for j in dc],
                [None if g is None else g[i] for g in ys_d],
                lambda: self._vjp(i, fn, primals, dc, ct_c, ys_d),
            )
        else:
            g_c, g_x, g_k = self._vjp(i, fn, primals, dc, ct_c, ys_d)
        return (
            _scatter(g_c, dc, call.n_init),
            _scatter(g_x, dx, call.n_xs),
            _scatter(g_k, dk, call.n_consts),
        )

    def _vjp(
        self,
        i: int,
        fn: Callable,
        primals: tuple,
        dc: list[int],
        ct_c: list[torch.Tensor | None],
        ys_d: list[torch.Tensor | None],
    ) -> tuple[Leaves, Leaves, Leaves]:
        if not transforms_active():
            # plain autograd records the step once (its inner torch.autograd.grad then builds
            # the double-backward graph without functorch's wrappers; see fmaml._autodiff)
            with _pulling_back():
                g_c, g_x, g_k = vjp_plain(
                    fn, primals, lambda out_c, out_y: self._cts(i, dc, ct_c, ys_d, out_c, out_y)
                )
        else:
            with _pulling_back():
                (out_c, out_y), vjp_fn = torch.func.vjp(fn, *primals)
            with _pulling_back():
                g_c, g_x, g_k = vjp_fn(self._cts(i, dc, ct_c, ys_d, out_c, out_y))
        return g_c, g_x, g_k

    @staticmethod
    def _cts(
        i: int,
        dc: list[int],
        ct_c: list[torch.Tensor | None],
        ys_d: list[torch.Tensor | None],
        out_c: Leaves,
        out_y: Leaves,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The cotangents of step ``i``'s differentiable outputs (zeros where none came)."""
        ct_c_d = [_zero_if_none(ct_c[j], o) for j, o in zip(dc, out_c, strict=True)]
        ct_y = [
            _zero_if_none(None if g is None else g[i], o) for g, o in zip(ys_d, out_y, strict=True)
        ]
        return ct_c_d, ct_y

    def _stack_xs(self, g_steps: list[Leaves | None]) -> Leaves:
        out: Leaves = []
        for j, (leaf, need) in enumerate(zip(self.xs, self.need_xs, strict=True)):
            if not need:
                out.append(None)
                continue
            rows = [_zero_if_none(None if g is None else g[j], leaf[0]) for g in g_steps]
            out.append(torch.stack(rows))
        return out

    def exact(self) -> tuple[Leaves, Leaves, Leaves]:
        """Differentiate a full recomputation with a graph: exact to any order."""
        static, call = self.static, self.static.call
        dc, dx, dk = self._pieces(self.init)

        def unroll(c: Leaves, xd: Leaves, kd: Leaves) -> tuple[Leaves, Leaves]:
            carry = _put(self.init, dc, c)
            xs, consts = _put(self.xs, dx, xd), _put(self.consts, dk, kd)
            ys = []
            for i in range(call.length):
                carry, y = call.call_step(i, carry, xs, consts)
                ys.append(y)
            _count("graph_evaluations", call.length)
            stacked = [torch.stack(col) for col in zip(*ys, strict=True)]
            return [carry[j] for j in dc], [t for t in stacked if _differentiable(t)]

        primals = (
            [self.init[j] for j in dc],
            [self.xs[j] for j in dx],
            [self.consts[j] for j in dk],
        )
        with preserve_rng(static.devices), torch.enable_grad():
            static.rng0.restore()
            with _pulling_back():
                (out_c, out_y), vjp_fn = torch.func.vjp(unroll, *primals)
        ct_c = [_zero_if_none(self.ct_carry[j], o) for j, o in zip(dc, out_c, strict=True)]
        ys_d = [g for g, f in zip(self.ct_ys, static.y_float, strict=True) if f]
        ct_y = [_zero_if_none(g, o) for g, o in zip(ys_d, out_y, strict=True)]
        with _pulling_back():
            g_c, g_x, g_k = vjp_fn((ct_c, ct_y))
        return (
            _scatter(g_c, dc, call.n_init),
            _scatter(g_x, dx, call.n_xs),
            _scatter(g_k, dk, call.n_consts),
        )


def _put(full: Sequence[Any], where: list[int], values: Sequence[Any]) -> Leaves:
    """A copy of ``full`` with ``values`` at the positions ``where``."""
    out = list(full)
    for j, v in zip(where, values, strict=True):
        out[j] = v
    return out


def _scatter(values: Sequence[Any], where: list[int], n: int) -> Leaves:
    return _put([None] * n, where, values)


def _zero_if_none(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b
