"""How ``compile=`` compiles a piece: ``torch.compile`` from below the ``torch.func`` transforms.

A meta-learning inner loop is a small function stepped many times, so eager PyTorch spends much
of its time in per-operator overhead. :func:`run` compiles one *piece* (a pure function of flat
tensors that ``fmaml._compiled_pieces`` builds: a MAML chunk, a scan's step, a step with its
pull-back) and runs it; this module holds the how, that one the what.

Two facts of ``torch.compile`` (torch 2.13) shape it:

1. A compiled function called *inside* an active ``torch.func`` transform (``vmap``, ``grad``) is
   not compiled: dynamo falls back to eager for the whole frame (PyTorch issue 128711), slower
   than plain eager. So :func:`run` *peels* the transforms off first: it unwraps the batched
   tensors of every active ``vmap`` level, leaves the levels, and calls a compiled
   ``vmap(fn, in_dims)`` from below (each batch dimension becomes a leading dimension of the
   outputs, which are wrapped back). A ``grad`` level is left only where it records nothing
   (grad mode off: a first-order backward pass); under a recording one the piece runs eagerly.
2. ``torch.autograd.grad`` breaks dynamo's graph while ``torch.func.grad`` traces, so the steps
   of a compiled piece differentiate with ``torch.func`` (``fmaml._autodiff`` checks
   :func:`torch.compiler.is_compiling`). Every compiled graph is a forward graph: gradients are
   traced ``vjp``/``grad`` inside it, never AOTAutograd's lazily compiled backward, so a
   compilation fails, if it does, where :func:`run` can fall back.

Every piece is cached by the *structure* of its call (what the caller's key says, plus the shapes,
dtypes and devices of its tensors, their batch dimensions, the transform levels peeled, grad mode
and the options) and each cache entry gets its own code object, so that dynamo's recompile limit
(per code object) counts one structure. The first call of a structure runs eagerly (validation,
the output structure, and the decisions of ``gate`` and ``when="auto"``); if compiling fails, the
structure runs eagerly from then on, after one warning that says why. Random operators are
compiled with inductor's ``fallback_random``: they draw from PyTorch's generators exactly as eager
code does, so a scan's replay of dropout stays exact.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
from torch._C import _functorch as _ft
from torch._C._functorch import TransformType, get_interpreter_stack
from torch._functorch.pyfunctorch import coerce_cinterpreter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fmaml._tree import traced_leaves

__all__ = [
    "Compile",
    "ReadsDifferentiated",
    "compile_stats",
    "keeps_graphs",
    "resolve_compile",
    "auto_declines",
    "run",
    "suppressed",
]

_WHEN = ("always", "auto")

#: ``when="auto"``'s default thresholds, mean FLOPs per operator (``docs/compile.md``).
AUTO_FLOPS_PER_OP = {"cpu": 2.0**18, "cuda": 2.0**27}
_OPTION_KEYS = ("when", "backend", "mode", "dynamic", "fullgraph", "options", "auto_flops_per_op")


@dataclass(frozen=True)
class Compile:
    """How :func:`fmaml.scan` and :class:`fmaml.MAML` compile their steps (``compile=``).

    ``compile=True`` is ``Compile()``, ``compile="auto"`` is ``Compile(when="auto")`` and a dict
    is ``Compile(**dict)``; ``compile=False`` (the default) compiles nothing.

    Args:
        when: ``"always"``: compile every piece that can be compiled. ``"auto"``: compile the
            pieces whose operators are small, where eager PyTorch's per-operator overhead
            dominates and compiling was measured to win: the first (eager) call of each
            structure counts its operators and their FLOPs (matmuls, convolutions), and the
            piece is compiled when the mean is at most ``auto_flops_per_op``. The sinusoid MLP
            (about 10^4 FLOPs per operator) is compiled, a conv4 MAML step (10^6 to 10^8) is
            not. See ``docs/compile.md`` for the measurements behind the rule.
        backend: ``torch.compile``'s ``backend`` (``"inductor"``, ``"aot_eager"``, ...).
        mode: ``torch.compile``'s ``mode``: ``None``, ``"reduce-overhead"`` (CUDA graphs on a
            GPU), ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``.
        dynamic: ``torch.compile``'s ``dynamic``. The default ``False`` compiles one graph per
            structure (shapes included); ``True`` compiles shape-generic graphs, and shapes then
            leave the cache key.
        fullgraph: ``True`` (the default) makes a graph break a compile failure, so that a piece
            that would compile only in part runs eagerly instead (with one warning).
        options: inductor options (``torch.compile``'s ``options``), added to fmaml's own
            ``{"fallback_random": True}`` (random operators as in eager mode).
        auto_flops_per_op: the threshold of ``when="auto"``; None: ``2**18`` on the CPU (from
            the measurements) and ``2**27`` on CUDA (kernel launches cost about what 10^8
            FLOPs do; not measured here).

    Example:
        >>> maml = fmaml.MAML(model, F.mse_loss, compile=True)  # doctest: +SKIP
        >>> fmaml.scan(f, init, xs, compile=fmaml.Compile(mode="reduce-overhead"))  # doctest: +SKIP
    """

    when: str = "always"
    backend: Any = "inductor"
    mode: str | None = None
    dynamic: bool | None = False
    fullgraph: bool = True
    options: Mapping[str, Any] | None = None
    auto_flops_per_op: float | None = None

    def __post_init__(self) -> None:
        if self.when not in _WHEN:
            raise ValueError(f"Compile: `when` must be one of {_WHEN}, got {self.when!r}.")
        if not (isinstance(self.backend, str) or callable(self.backend)):
            raise TypeError(
                f"Compile: `backend` must be a torch.compile backend name (e.g. 'inductor') or "
                f"a callable, got {self.backend!r}."
            )
        if self.mode is not None:
            from torch._inductor import list_mode_options

            modes = [m for m in list_mode_options() if m != "default"]
            if self.mode not in modes and self.mode != "default":
                raise ValueError(
                    f"Compile: `mode` must be None or one of {modes}, got {self.mode!r}."
                )
        if self.dynamic not in (None, True, False):
            raise TypeError(
                f"Compile: `dynamic` must be True, False or None, got {self.dynamic!r}."
            )
        if self.options is not None and not isinstance(self.options, Mapping):
            raise TypeError(
                f"Compile: `options` must be a dict of inductor options, got {self.options!r}."
            )
        if self.backend != "inductor" and (self.mode is not None or self.options):
            raise ValueError(
                f"Compile: `mode` and `options` are inductor's; backend {self.backend!r} takes "
                "neither. Drop them or use backend='inductor'."
            )
        if not isinstance(self.fullgraph, bool):
            raise TypeError(f"Compile: `fullgraph` must be True or False, got {self.fullgraph!r}.")
        threshold = self.auto_flops_per_op
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not threshold >= 0
        ):
            raise ValueError(
                f"Compile: `auto_flops_per_op` must be a number >= 0 or None, got {threshold!r}."
            )

    def torch_options(self) -> dict[str, Any]:
        """The keyword arguments of ``torch.compile``: the backend behind fmaml's check that a
        piece reads no differentiated tensor it was not given (:class:`_OnlyItsInputs`)."""
        if self.backend == "inductor":
            options = {"fallback_random": True, **dict(self.options or {})}
            inner = torch._TorchCompileInductorWrapper(self.mode, options, self.dynamic)
        elif isinstance(self.backend, str):
            inner = torch._dynamo.lookup_backend(self.backend)
        else:
            inner = self.backend
        return {
            "backend": _OnlyItsInputs(inner),
            "dynamic": self.dynamic,
            "fullgraph": self.fullgraph,
        }

    def key(self) -> Hashable:
        """What the compile cache keys on (computed once: a frozen object)."""
        return self._key

    @functools.cached_property
    def _key(self) -> Hashable:
        options = tuple(sorted((k, repr(v)) for k, v in (self.options or {}).items()))
        return (
            self.when,
            repr(self.backend),
            self.mode,
            self.dynamic,
            self.fullgraph,
            options,
            self.auto_flops_per_op,
        )


class ReadsDifferentiated(RuntimeError):
    """A piece reads a tensor that requires grad but is not one of its inputs."""


class _OnlyItsInputs:
    """A ``torch.compile`` backend that refuses a graph reading a tensor that requires grad
    from anywhere but the piece's own arguments (a closure over a parameter, a global).

    The pieces run without recording (or take their gradients inside): such a tensor's gradient
    would be lost, silently. dynamo guards on ``requires_grad``, so a tensor that starts
    requiring grad later recompiles, and is refused then. The piece then runs eagerly, where the
    scan's own checks raise or record it properly.
    """

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        name = getattr(self.inner, "compiler_name", None) or getattr(self.inner, "__name__", "")
        return str(name or type(self.inner).__name__)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, example in zip(placeholders, example_inputs, strict=False):
            grapharg = node.meta.get("grapharg")
            source = grapharg.source.name if grapharg is not None else node.name
            given = source.startswith("L['args']")
            if isinstance(example, torch.Tensor) and example.requires_grad and not given:
                raise ReadsDifferentiated(
                    "it reads a tensor that requires grad but is not one of its inputs (a "
                    f"closure? {source}), so that tensor's gradient would be lost"
                )
        return self.inner(gm, example_inputs)


def resolve_compile(value: object, owner: str) -> Compile | None:
    """The :class:`Compile` behind ``compile=`` (None: compile nothing)."""
    if value is False or value is None:
        return None
    if value is True:
        return Compile()
    if value == "auto":
        return Compile(when="auto")
    if isinstance(value, Compile):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(_OPTION_KEYS))
        if unknown:
            raise ValueError(
                f"{owner}: unknown `compile` option(s) {unknown}; expected some of "
                f"{list(_OPTION_KEYS)} (torch.compile's backend, mode, dynamic, fullgraph, "
                "options, and fmaml's when)."
            )
        return Compile(**value)
    raise ValueError(
        f"{owner}: `compile` must be True, False, 'auto', a dict of torch.compile options "
        f"(e.g. {{'mode': 'reduce-overhead'}}) or fmaml.Compile(...), got {value!r}."
    )


# --------------------------------------------------------------------------------------------
# statistics, for tests and benchmarks


@dataclass
class CompileStats:
    """What the compiled pieces did in this process (see :func:`compile_stats`).

    Attributes:
        compiled: cache entries created (one per structure that was compiled).
        calls: calls of compiled pieces.
        eager: calls that ran eagerly because the piece could not be compiled there (a
            recording ``grad`` level, a failed compilation, or ``when="auto"``).
        failures: the reasons compilations failed, one per structure.
    """

    compiled: int = 0
    calls: int = 0
    eager: int = 0
    failures: list[str] = field(default_factory=list)


_STATS = CompileStats()


@contextlib.contextmanager
def compile_stats() -> Iterator[CompileStats]:
    """Count the compiled pieces' cache entries and calls made inside the block."""
    before = CompileStats(_STATS.compiled, _STATS.calls, _STATS.eager, list(_STATS.failures))
    diff = CompileStats()
    try:
        yield diff
    finally:
        diff.compiled = _STATS.compiled - before.compiled
        diff.calls = _STATS.calls - before.calls
        diff.eager = _STATS.eager - before.eager
        diff.failures = _STATS.failures[len(before.failures) :]


# --------------------------------------------------------------------------------------------
# the cache


def _runner(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


_CACHE: dict[Hashable, Any] = {}
_FAILED: dict[Hashable, str] = {}
_OUT_SPECS: dict[Hashable, Any] = {}
_EAGER: dict[Hashable, str] = {}  # the first call decided against compiling: "gate", "auto"
_AUTO: dict[Hashable, bool] = {}  # auto_declines's decisions
_WARNED: set[str] = set()
_LOCK = threading.Lock()


#: The most structures compiled for one function; beyond, new structures run eagerly.
MAX_STRUCTURES = 32
_FAMILIES: dict[Hashable, int] = {}


def _compiled_runner(spec: Compile, key: Hashable, family: Hashable, what: str) -> Any:
    """A ``torch.compile``'d runner of its own (a fresh code object) for one structure; None
    once ``family`` (the function) has had :data:`MAX_STRUCTURES` structures compiled."""
    with _LOCK:
        runner = _CACHE.get(key)
        if runner is None:
            if _FAMILIES.get(family, 0) >= MAX_STRUCTURES:
                reason = (
                    f"more than {MAX_STRUCTURES} structures of {what} (shapes, dtypes, closures)"
                )
                if reason not in _WARNED:
                    _WARNED.add(reason)
                    warnings.warn(
                        f"fmaml: {reason} were compiled; new ones run eagerly. A step that "
                        "closes over a new object at every call compiles anew each time: pass "
                        "stable objects, or compile=False.",
                        RuntimeWarning,
                        stacklevel=5,
                    )
                return None
            _FAMILIES[family] = _FAMILIES.get(family, 0) + 1
            name = f"fmaml_compiled_{len(_CACHE)}"
            code = _runner.__code__.replace(co_name=name, co_qualname=name)
            fresh = types.FunctionType(code, _runner.__globals__, name)
            runner = torch.compile(fresh, **spec.torch_options())
            _CACHE[key] = runner
            _STATS.compiled += 1
    return runner


def clear_cache() -> None:
    """Forget every compiled piece and failure (for tests; ``torch._dynamo.reset()`` too)."""
    with _LOCK:
        _CACHE.clear()
        _FAILED.clear()
        _OUT_SPECS.clear()
        _EAGER.clear()
        _AUTO.clear()
        _FAMILIES.clear()
        _WARNED.clear()


def _reason(error: BaseException) -> str:
    """One line on why compiling failed: the innermost cause (a backend wraps what it met)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        parts.append(f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": "))
        error = getattr(error, "inner_exception", None) or error.__cause__
    return " <- ".join(parts)[:600]


def _fail(key: Hashable, error: BaseException, what: str) -> None:
    reason = _reason(error)
    _FAILED[key] = reason
    _STATS.failures.append(reason)
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"fmaml: torch.compile failed for {what}, which runs eagerly from now on (same "
            f"results, eager speed). Why: {reason}. Pass compile=False to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------
# peeling torch.func transforms


def _describe(args: Sequence[Any], shapes: bool) -> tuple:
    """The cache key's view of the arguments: dtype, device, requires_grad (and shape)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            shape = tuple(a.shape) if shapes else a.dim()
            out.append((shape, a.dtype, a.device, a.requires_grad))
        else:
            out.append(None if a is None else ("const", repr(a)))
    return tuple(out)


class _CannotPeel(Exception):
    """A transform level that must record (a ``grad`` level in grad mode): run eagerly."""


def _peel(
    fn: Callable[..., Sequence[Any]], args: Sequence[Any]
) -> tuple[Callable[..., Sequence[Any]], list[Any], list[tuple]]:
    """Unwrap ``args`` from every active transform level, innermost first.

    Returns the function to call at the base level (``fn`` under one ``vmap`` per batch level),
    its arguments, and one description per level, innermost first: ``("vmap", level, in_dims,
    randomness, batch_size)``, ``("vmap-unused", level)`` or ``("grad-off", level)``. Raises
    :class:`_CannotPeel` at a level that must record (``grad``, ``jvp`` in grad mode).
    """
    described: list[tuple] = []
    for cinterp in reversed(get_interpreter_stack() or []):
        interp = coerce_cinterpreter(cinterp)
        level = interp.level()
        if interp.key() == TransformType.Vmap:
            values, dims = [], []
            for a in args:
                if isinstance(a, torch.Tensor) and _batched_at(a, level):
                    v, d = _ft._unwrap_batched(a, level)
                else:
                    v, d = a, None
                values.append(v)
                dims.append(d)
            if all(d is None for d in dims):
                if interp.randomness() == "different":
                    # each task would draw its own random numbers: only eager vmap knows how
                    raise _CannotPeel("vmap")
                described.append(("vmap-unused", level))
            else:
                fn = torch.func.vmap(
                    fn, in_dims=tuple(dims), out_dims=0, randomness=interp.randomness()
                )
                described.append(
                    ("vmap", level, tuple(dims), interp.randomness(), interp.batch_size())
                )
            args = values
        elif interp.key() == TransformType.Grad and not torch.is_grad_enabled():
            args = [
                _ft._unwrap_for_grad(a, level) if isinstance(a, torch.Tensor) else a for a in args
            ]
            described.append(("grad-off", level))
        else:
            raise _CannotPeel(interp.key().name)
    return fn, list(args), described


def _batched_at(t: torch.Tensor, level: int) -> bool:
    return bool(_ft.is_batchedtensor(t)) and _ft.maybe_get_level(t) == level


@contextlib.contextmanager
def _base_level() -> Iterator[None]:
    """Leave every transform level for the block (they are restored after it)."""
    stack = []
    try:
        while _ft.peek_interpreter_stack() is not None:
            stack.append(_ft.pop_dynamic_layer_stack())
        yield
    finally:
        while stack:
            _ft.push_dynamic_layer_stack(stack.pop())


def _rewrap(outputs: Sequence[torch.Tensor], described: list[tuple]) -> list[torch.Tensor]:
    """Wrap base-level outputs back into the batch levels that were peeled, outermost first
    (each ``vmap`` put its batch dimension first)."""
    out = list(outputs)
    for desc in reversed(described):
        if desc[0] == "vmap":
            out = [_ft._add_batch_dim(t, 0, desc[1]) for t in out]
    return out


# --------------------------------------------------------------------------------------------
# the one entry point


def run(
    spec: Compile,
    key: Hashable,
    fn: Callable[..., Any],
    args: Sequence[Any],
    eager: Callable[[], Any],
    *,
    what: str,
    gate: Callable[[Callable[[], Any]], tuple[Any, bool]] | None = None,
    keep_graphs: bool = False,
    family: Hashable = None,
) -> Any:
    """``fn(*args)`` compiled and run from the base transform level, or ``eager()``.

    ``fn`` maps flat tensors (or None) to a pytree of tensors; it must be pure, traceable, and
    compute what ``eager()`` computes (the caller's own code, at the caller's level), in a pytree
    of the same structure. ``key`` describes everything about ``fn`` that ``args`` do not (the
    piece, the step's code, the pytree structures).

    ``eager()`` runs instead where the piece cannot be compiled: under a recording ``grad``
    level, the first time a structure is seen (so that the caller's validation and error
    messages come from eager code, and the output structure is learnt), where that first call
    decided against compiling (``when="auto"``, or ``gate``: ``gate(eager) -> (output,
    compile?)`` runs the first call), and after a failed compilation (which warns once).
    ``keep_graphs``: a scan with ``"auto"`` inside ``fn`` traces as its plain loop (the caller's
    gate checked that it keeps its graphs). ``family``: what the structures of one function
    share (its code), for the bound :data:`MAX_STRUCTURES`.
    """
    if _SUPPRESSED:  # inside a piece that "auto" left eager: so are its parts
        _STATS.eager += 1
        return eager()
    try:
        peeled, base_args, described = _peel(functools.partial(_flat_out, fn), args)
    except _CannotPeel:
        _STATS.eager += 1
        return eager()
    full_key = (
        key,
        tuple(described),
        _describe(base_args, shapes=not spec.dynamic),
        torch.is_grad_enabled(),
        spec.key(),
    )
    if full_key in _FAILED or full_key in _EAGER:
        _STATS.eager += 1
        if _EAGER.get(full_key) == "auto":
            with _suppressing():
                return eager()
        return eager()
    if full_key not in _OUT_SPECS:
        _STATS.eager += 1
        out, declined = _first_call(spec, base_args, eager, gate)
        if declined is not None:
            _EAGER[full_key] = declined
        _OUT_SPECS[full_key] = optree.tree_structure(out, none_is_leaf=False)
        return out
    runner = _compiled_runner(spec, full_key, family, what)
    if runner is None:  # too many structures of this function: eager (warned once)
        _STATS.eager += 1
        return eager()
    first = not getattr(runner, "_fmaml_ran", False)
    rng = torch.get_rng_state() if first else None  # compiling: put the RNG back if it fails
    try:
        with _base_level(), _keeping_graphs(keep_graphs):
            leaves = runner(peeled, *base_args)
    except Exception as error:  # a failed compilation: eager, with one warning
        # a later call fails to compile only when dynamo recompiles (its guards failed)
        if not first and not isinstance(error, torch._dynamo.exc.TorchDynamoException):
            raise
        if rng is not None:
            torch.set_rng_state(rng)
        _fail(full_key, error, what)
        _STATS.eager += 1
        return eager()
    runner._fmaml_ran = True
    _STATS.calls += 1
    return optree.tree_unflatten(_OUT_SPECS[full_key], _rewrap(leaves, described))


def _first_call(
    spec: Compile,
    args: Sequence[Any],
    eager: Callable[[], Any],
    gate: Callable[[Callable[[], Any]], tuple[Any, bool]] | None,
) -> tuple[Any, str | None]:
    """The first, eager call of a structure, and who declined to compile it from then on:
    None (nobody), ``"gate"`` or ``"auto"`` (then its parts stay eager as well)."""
    count = _OperatorCount() if spec.when == "auto" else contextlib.nullcontext()
    with count:
        out, compiles = gate(eager) if gate is not None else (eager(), True)
    if spec.when == "auto" and not count.compiles(spec, args):
        return out, "auto"
    return out, None if compiles else "gate"


def auto_declines(
    spec: Compile, key: Hashable, args: Sequence[Any], eager: Callable[[], Any]
) -> Any:
    """For a caller that chooses *how* to run before any piece does (a ``store_all`` scan runs
    as a compiled one-step scan only where that wins): ``(True, eager())`` where
    ``when="auto"`` declines ``key`` (decided by counting FLOPs on its first call, which
    ``eager()`` then is), else ``(False, None)``."""
    if spec.when != "auto":
        return False, None
    full_key = ("auto", key, _describe(args, shapes=not spec.dynamic), torch.is_grad_enabled())
    decided = _AUTO.get(full_key)
    if decided is None:
        with _OperatorCount() as count:
            out = eager()
        _AUTO[full_key] = not count.compiles(spec, args)
        return _AUTO[full_key], out if _AUTO[full_key] else None
    return (True, eager()) if decided else (False, None)


_SUPPRESSED = 0


@contextlib.contextmanager
def _suppressing() -> Iterator[None]:
    global _SUPPRESSED
    _SUPPRESSED += 1
    try:
        yield
    finally:
        _SUPPRESSED -= 1


def suppressed() -> bool:
    """Whether a piece that ``when="auto"`` left eager is running (its parts run eagerly)."""
    return _SUPPRESSED > 0


_KEEP_GRAPHS = False


@contextlib.contextmanager
def _keeping_graphs(value: bool) -> Iterator[None]:
    global _KEEP_GRAPHS
    saved, _KEEP_GRAPHS = _KEEP_GRAPHS, value
    try:
        yield
    finally:
        _KEEP_GRAPHS = saved


def keeps_graphs() -> bool:
    """Whether a scan traced now belongs to a piece whose scans were found to keep their graphs
    (then :class:`fmaml.Auto` traces as the plain loop)."""
    return _KEEP_GRAPHS


def _flat_out(fn: Callable[..., Any], *args: Any) -> list[Any]:
    return traced_leaves(fn(*args))


class _OperatorCount(TorchDispatchMode):
    """Counts the operators run inside it and their FLOPs (``when="auto"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        formula = flop_registry.get(getattr(func, "_overloadpacket", None))
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out

    def flops_per_op(self) -> float:
        return self.flops / max(self.ops, 1)

    def compiles(self, spec: Compile, args: Sequence[Any]) -> bool:
        """Whether ``when="auto"`` compiles a piece whose eager call this counted."""
        threshold = spec.auto_flops_per_op
        if threshold is None:
            cuda = any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)
            threshold = AUTO_FLOPS_PER_OP["cuda" if cuda else "cpu"]
        return self.flops_per_op() <= threshold
