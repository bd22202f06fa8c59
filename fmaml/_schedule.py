"""Checkpointing schedules for reverse-mode differentiation of a scan.

A scan of ``length`` steps maps a carry ``x_0`` through ``x_{i+1} = step_i(x_i)``. Reversing it
needs every intermediate carry ``x_i``, in the order ``x_{length-1}, ..., x_0``. Storing all of
them costs ``length`` carries of memory; checkpointing stores a few and recomputes the rest. This
module only *plans* that trade-off. It is pure Python (standard library only, no torch): a
:class:`Plan` is a straight-line program that an executor elsewhere runs.

The action language
-------------------
The executor holds one *current carry* (a register whose step index we call ``current``) and a
set of stored *snapshots* keyed by step index.

* ``Advance(start, stop)`` -- evaluate steps ``start, ..., stop - 1`` without building a graph.
  Requires ``current == start``; afterwards ``current == stop``.
* ``Snapshot(index)`` -- store the current carry under ``index``. Requires ``current == index``.
* ``Restore(index)`` -- make the live snapshot ``index`` the current carry (``current = index``).
* ``Free(index)`` -- drop the live snapshot ``index``.
* ``StepBackward(index)`` -- requires ``current == index``; evaluate step ``index`` with a graph
  and pull the cotangent back through it. Afterwards ``current`` is undefined, so the next
  ``Advance``/``StepBackward`` must be preceded by a ``Restore``.

For ``length >= 1`` every plan is split in two parts:

* ``forward`` starts with ``Snapshot(0)`` (the initial carry counts as a snapshot, as in revolve),
  contains only ``Advance``/``Snapshot`` and leaves ``current == length - 1``. The executor then
  evaluates the final step once more itself to produce the scan's output; that evaluation is
  not part of the plan.
* ``backward`` starts with ``StepBackward(length - 1)``, contains ``StepBackward(i)`` exactly once
  for every ``i`` in descending order, and ends with every snapshot freed (``Free(0)`` included).

``Plan.snapshots`` is the largest number of snapshots live at once and ``Plan.evaluations`` the
total number of steps evaluated by ``Advance`` actions (the graph-building evaluation inside each
``StepBackward`` is not counted).

Policies
--------
:func:`binomial_plan` builds the optimal offline binomial schedule of Griewank & Walther,
"Algorithm 799: revolve: an implementation of checkpointing for the reverse or adjoint mode of
computational differentiation", ACM TOMS 26(1), 2000. Its cost is given in closed form by
:func:`binomial_cost`. :func:`uniform_plan` is the simple "snapshot every ``n`` steps" policy.
:func:`validate_plan` replays a plan and checks every rule above.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeAlias

__all__ = [
    "Action",
    "Advance",
    "Free",
    "Plan",
    "Restore",
    "Snapshot",
    "StepBackward",
    "binomial_cost",
    "binomial_plan",
    "uniform_plan",
    "validate_plan",
]


# --------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Advance:
    """Evaluate steps ``start .. stop - 1`` without a graph (``current``: ``start`` -> ``stop``)."""

    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Store the current carry (``current == index``) as the snapshot ``index``."""

    index: int


@dataclass(frozen=True, slots=True)
class Restore:
    """Make the live snapshot ``index`` the current carry (``current = index``)."""

    index: int


@dataclass(frozen=True, slots=True)
class Free:
    """Drop the live snapshot ``index``."""

    index: int


@dataclass(frozen=True, slots=True)
class StepBackward:
    """Evaluate step ``index`` (``current == index``) with a graph and pull the cotangent back."""

    index: int


Action: TypeAlias = Advance | Snapshot | Restore | Free | StepBackward
_ACTION_TYPES = (Advance, Snapshot, Restore, Free, StepBackward)


def _short(action: object) -> str:
    """Compact rendering of an action, e.g. ``Advance(0, 5)``."""
    if isinstance(action, Advance):
        return f"Advance({action.start}, {action.stop})"
    if isinstance(action, _ACTION_TYPES):
        return f"{type(action).__name__}({action.index})"
    return repr(action)


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """An immutable checkpointing schedule for a scan of ``length`` steps.

    Attributes:
        length: number of scan steps.
        forward: the forward sweep, ``Snapshot(0)`` followed by ``Advance``/``Snapshot`` actions;
            it leaves ``current == length - 1``.
        backward: the reverse sweep, from ``StepBackward(length - 1)`` to the final ``Free``.
        snapshots: the largest number of snapshots live at once over the whole plan.
        evaluations: the number of steps evaluated by ``Advance`` actions (forward + backward).
    """

    length: int
    forward: tuple[Action, ...] = field(repr=False)
    backward: tuple[Action, ...] = field(repr=False)
    snapshots: int
    evaluations: int

    def describe(self, head: int = 8) -> str:
        """A short human-readable multi-line summary (sizes, costs and the first actions)."""
        per_step = self.evaluations / self.length if self.length else 0.0
        actions = self.forward + self.backward[: max(head - len(self.forward), 0)]
        shown = ", ".join(_short(a) for a in actions[:head])
        total = len(self.forward) + len(self.backward)
        more = f", ... ({total - head} more)" if total > head else ""
        return "\n".join(
            [
                f"Plan for a scan of length {self.length}",
                f"  snapshots:   {self.snapshots} live at most",
                f"  evaluations: {self.evaluations} ({per_step:.3f} per step, "
                "excluding the graph evaluation of each StepBackward)",
                f"  actions:     {len(self.forward)} forward, {len(self.backward)} backward",
                f"  first:       {shown}{more}" if total else "  first:       (none)",
            ]
        )


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a plan is built.

    A long plan allocates hundreds of thousands of small acyclic objects, which would trigger
    repeated full collections (expensive when a large heap such as torch's is loaded): about 3x
    slower for ``length = 100_000``. Reference counting still frees everything; the previous
    collector state is restored.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _make_plan(length: int, actions: list[Action]) -> Plan:
    """Split ``actions`` at the first ``StepBackward`` and tally snapshots and evaluations."""
    split = next(
        (k for k, action in enumerate(actions) if isinstance(action, StepBackward)), len(actions)
    )
    live = peak = evaluations = 0
    for action in actions:
        kind = type(action)
        if kind is Advance:
            evaluations += action.stop - action.start  # type: ignore[union-attr]
        elif kind is Snapshot:
            live += 1
            peak = max(peak, live)
        elif kind is Free:
            live -= 1
    return Plan(
        length=length,
        forward=tuple(actions[:split]),
        backward=tuple(actions[split:]),
        snapshots=peak,
        evaluations=evaluations,
    )


# --------------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------------


def _check_int(func: str, name: str, value: object, minimum: int, hint: str = "") -> int:
    """Return ``value`` as an ``int >= minimum`` or raise a TypeError/ValueError naming it."""
    expected = f"an int >= {minimum}"
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(
            f"{func}: `{name}` must be {expected}, got {value!r} of type {type(value).__name__}."
            + (f" {hint}" if hint else "")
        )
    result = operator.index(value)  # type: ignore[call-overload]
    if result < minimum:
        raise ValueError(
            f"{func}: `{name}` must be {expected}, got {result}." + (f" {hint}" if hint else "")
        )
    return int(result)


_LENGTH_HINT = "Pass the number of scan steps."
_SNAPSHOTS_HINT = "Pass at least one snapshot (the initial carry counts as one)."
_EVERY_HINT = "Pass the distance in steps between stored carries (1 stores every carry)."


# --------------------------------------------------------------------------------------------
# Binomial (revolve) cost
# --------------------------------------------------------------------------------------------


def _revolve_cost(length: int, slots: int) -> int:
    r"""Closed form of the optimal revolve cost ``F(l, c)`` (no argument checking).

    With ``c = min(slots, l)`` and ``t`` the least integer with :math:`\binom{c+t}{c} \ge l`,

    .. math:: F(l, c) = t\,l - \binom{c+t}{t-1}, \qquad \binom{n}{-1} = 0,

    (``numforw`` in ADOL-C's revolve). ``F(l, 1) = l(l-1)/2`` and ``F(l, c) = l - 1`` for
    ``c >= l - 1``. ``F(·, c)`` is continuous and piecewise linear with slope ``t`` on
    :math:`\binom{c+t-1}{c} < l \le \binom{c+t}{c}`, hence convex. Cost is ``O(t)``.
    """
    if length <= 1:
        return 0
    c = min(slots, length)
    if c == 1:
        return length * (length - 1) // 2
    t, beta = 0, 1  # beta = C(c + t, c)
    while beta < length:
        t += 1
        beta = beta * (c + t) // t
    # C(c + t, t - 1) = C(c + t, c + 1) = C(c + t, c) * t / (c + 1)
    return t * length - beta * t // (c + 1)


def binomial_cost(length: int, snapshots: int) -> int:
    r"""Minimal number of ``Advance`` evaluations to reverse ``length`` steps with ``snapshots``.

    This is the cost of :func:`binomial_plan`. With ``l = length``, ``c = min(snapshots, l)``
    and ``t`` the least integer such that :math:`\binom{c+t}{c} \ge l`:

    .. math:: p(l, c) = t\,l - \binom{c+t}{t-1} \qquad (\binom{n}{-1} = 0).

    It satisfies ``p(l, 1) = l(l-1)/2``, ``p(l, c) = l - 1`` for ``c >= l - 1`` (and ``l >= 1``),
    ``p(0, c) = 0``, and is the solution of the recursion
    ``F(l, c) = min_{0<m<l} [m + F(l-m, c-1) + F(m, c)]`` with ``F(1, c) = 0``.
    """
    length = _check_int("binomial_cost", "length", length, 0, _LENGTH_HINT)
    snapshots = _check_int("binomial_cost", "snapshots", snapshots, 1, _SNAPSHOTS_HINT)
    return _revolve_cost(length, snapshots)


# --------------------------------------------------------------------------------------------
# Binomial (revolve) plan
# --------------------------------------------------------------------------------------------


def _best_split(length: int, slots: int, cost: dict[tuple[int, int], int]) -> int:
    """Optimal first split ``m`` (``0 < m < length``) of the recursion, by binary search.

    ``g(m) = m + F(length - m, slots - 1) + F(m, slots)`` is convex in ``m`` (a sum of convex
    functions), so the smallest ``m`` with ``g(m + 1) - g(m) >= 0`` minimises it. Requires
    ``length >= 2`` and ``slots >= 2``. ``cost`` memoises ``F`` for the current build.
    """

    def f(l_: int, c_: int) -> int:
        key = (l_, c_)
        value = cost.get(key)
        if value is None:
            value = cost[key] = _revolve_cost(l_, c_)
        return value

    lo, hi = 1, length - 1
    while lo < hi:
        mid = (lo + hi) // 2
        # g(mid + 1) - g(mid)
        diff = (
            1
            + f(length - mid - 1, slots - 1)
            - f(length - mid, slots - 1)
            + f(mid + 1, slots)
            - f(mid, slots)
        )
        if diff >= 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _binomial_actions(length: int, slots: int) -> list[Action]:
    """The full action list of the optimal binomial schedule (``length >= 1``).

    ``reverse(a, b, c)`` reverses steps ``[a, b)`` with ``current == a``, the carry ``a`` stored
    and ``c`` slots (the one holding ``a`` included):

    * ``b - a == 1``: ``StepBackward(a)``;
    * ``c == 1``: for ``i = b-1 .. a``: ``Restore(a)`` (unless current), ``Advance(a, i)``,
      ``StepBackward(i)``;
    * otherwise, with ``m`` from :func:`_best_split`: ``Advance(a, m)``, ``Snapshot(m)`` (when
      ``b - m > 1``), ``reverse(m, b, c - 1)``, ``Free(m)``, ``Restore(a)``, ``reverse(a, m, c)``.

    An explicit stack replaces the recursion, so deep schedules cannot overflow Python's stack.
    """
    actions: list[Action] = [Snapshot(0)]
    emit = actions.append
    cost: dict[tuple[int, int], int] = {}
    splits: dict[tuple[int, int], int] = {}
    # Items are either a pending action or a (a, b, c) reversal task.
    stack: list[Action | tuple[int, int, int]] = [(0, length, min(slots, length))]
    while stack:
        item = stack.pop()
        if not isinstance(item, tuple):
            emit(item)
            continue
        a, b, c = item
        n = b - a
        if n == 1:
            emit(StepBackward(a))
        elif c == 1:
            restore = Restore(a)
            for i in range(b - 1, a - 1, -1):
                if i != b - 1:
                    emit(restore)
                if i > a:
                    emit(Advance(a, i))
                emit(StepBackward(i))
        else:
            c = min(c, n)
            key = (n, c)
            m = splits.get(key)
            if m is None:
                m = splits[key] = _best_split(n, c, cost)
            m += a
            emit(Advance(a, m))
            # Run in reverse order of pushing: reverse(m, b), Free(m), Restore(a), reverse(a, m).
            stack.append((a, m, c))
            stack.append(Restore(a))
            if b - m > 1:
                emit(Snapshot(m))
                stack.append(Free(m))
            stack.append((m, b, c - 1))
    emit(Free(0))
    return actions


@functools.lru_cache(maxsize=32)
def _binomial_plan_cached(length: int, slots: int) -> Plan:
    if length == 0:
        return Plan(length=0, forward=(), backward=(), snapshots=0, evaluations=0)
    with _gc_paused():
        return _make_plan(length, _binomial_actions(length, slots))


def binomial_plan(length: int, snapshots: int) -> Plan:
    r"""The optimal offline binomial ("revolve") schedule with at most ``snapshots`` snapshots.

    ``snapshots`` counts the initial carry. The plan's ``evaluations`` equal
    :func:`binomial_cost` ``(length, snapshots)`` exactly, the minimum of

    .. math:: F(l, c) = \min_{0<m<l} \bigl[m + F(l-m, c-1) + F(m, c)\bigr],
              \quad F(1, c) = 0,\quad F(l, 1) = \tfrac{l(l-1)}{2},

    over all schedules that advance from ``0`` to a split ``m``, reverse ``[m, l)`` with one slot
    fewer and then ``[0, m)`` with the same slots, recursively (Griewank & Walther, 2000). The
    split is found by binary search on the convex ``m -> m + F(l-m, c-1) + F(m, c)``, taking the
    smallest optimal ``m``; with that choice the plan uses exactly ``min(snapshots, length - 1)``
    snapshots for ``length >= 2`` (1 for ``length == 1``). With ``snapshots >= length - 1`` it
    stores every carry but the last one and never recomputes (``length - 1`` evaluations).

    Plans are cached (``functools.lru_cache``); they are immutable. Building is iterative (no
    recursion limit); ``binomial_plan(10_000, 14)`` takes well under a second.
    """
    length = _check_int("binomial_plan", "length", length, 0, _LENGTH_HINT)
    snapshots = _check_int("binomial_plan", "snapshots", snapshots, 1, _SNAPSHOTS_HINT)
    return _binomial_plan_cached(length, min(snapshots, max(length, 1)))


# --------------------------------------------------------------------------------------------
# Uniform plan
# --------------------------------------------------------------------------------------------


def _uniform_actions(length: int, every: int) -> list[Action]:
    """The full action list of :func:`uniform_plan` (``length >= 1``)."""
    # Segment starts: 0 and the positive multiples of `every` below length - 1 (the carry at
    # length - 1 is current when the backward sweep starts, so it is never stored).
    starts = [0, *range(every, length - 1, every)]
    actions: list[Action] = [Snapshot(0)]
    emit = actions.append
    for prev, start in itertools.pairwise(starts):
        emit(Advance(prev, start))
        emit(Snapshot(start))
    if starts[-1] < length - 1:
        emit(Advance(starts[-1], length - 1))
    emit(StepBackward(length - 1))
    stops = [*starts[1:], length - 1]  # the last segment's final step is already reversed
    for start, stop in zip(reversed(starts), reversed(stops), strict=True):
        # Reverse [start, stop): recompute once, keeping start+1 .. stop-2 as temporaries.
        if stop - start > 1:
            emit(Restore(start))
            for j in range(start + 1, stop - 1):
                emit(Advance(j - 1, j))
                emit(Snapshot(j))
            emit(Advance(stop - 2, stop - 1))
            emit(StepBackward(stop - 1))
            for j in range(stop - 2, start, -1):
                emit(Restore(j))
                emit(StepBackward(j))
                emit(Free(j))
        if stop > start:  # only empty for length == 1
            emit(Restore(start))
            emit(StepBackward(start))
        emit(Free(start))
    return actions


@functools.lru_cache(maxsize=32)
def _uniform_plan_cached(length: int, every: int) -> Plan:
    if length == 0:
        return Plan(length=0, forward=(), backward=(), snapshots=0, evaluations=0)
    with _gc_paused():
        return _make_plan(length, _uniform_actions(length, every))


def uniform_plan(length: int, every: int) -> Plan:
    r"""Snapshot every ``every`` steps; recompute each segment once in the backward sweep.

    Forward: ``Snapshot(0), Advance(0, n), Snapshot(n), Advance(n, 2n), ...`` up to
    ``current == length - 1``; the carries ``0`` and ``k n`` with ``0 < k n < l - 1`` are stored
    (``l = length``, ``n = every``), which cuts the scan into segments ``[s, e)``. Backward:
    ``StepBackward(l - 1)`` on the current carry; then, last segment first, the part ``[s, e)``
    not yet reversed (``[s_K, l - 1)`` for the last segment ``[s_K, l)``) is recomputed once from
    its snapshot, storing ``s + 1 .. e - 2`` as temporaries (``e - 1`` stays current and is
    reversed directly), and reversed with ``Restore(j), StepBackward(j), Free(j)``; the segment's
    own snapshot ``s`` is freed after ``StepBackward(s)``.

    Closed forms, for ``l >= 2`` with ``K = floor((l - 2) / n)`` stored carries besides ``0`` and
    ``L = l - K n`` (``2 <= L <= n + 1``) the length of the last segment ``[s_K, l)``:

    .. math::

        \text{evaluations} = 2l - 3 - K,
        \qquad
        \text{snapshots} = K + \max\bigl(1,\; L - 2,\; [K \ge 1](n - 2)\bigr).

    (The forward sweep costs ``l - 1``, each full segment ``n - 1`` and the last one ``L - 2``.
    The peak is ``K + 1`` stored carries plus ``L - 3`` temporaries while the last segment is
    recomputed, or ``K`` plus ``n - 2`` during the segment before it.) For ``l = 1``:
    ``evaluations = 0, snapshots = 1``; for ``l = 0`` both are ``0``. ``every = 1`` stores every
    carry but the last (``l - 1`` snapshots, ``l - 1`` evaluations); ``every >= l - 1`` stores
    only ``x_0`` in the forward sweep and recomputes once (``2l - 3`` evaluations).
    """
    length = _check_int("uniform_plan", "length", length, 0, _LENGTH_HINT)
    every = _check_int("uniform_plan", "every", every, 1, _EVERY_HINT)
    return _uniform_plan_cached(length, min(every, max(length - 1, 1)))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _fmt_live(live: Iterable[int]) -> str:
    items = sorted(live)
    shown = ", ".join(map(str, items[:8]))
    return f"[{shown}{', ...' if len(items) > 8 else ''}]"


def validate_plan(plan: Plan) -> None:
    """Replay ``plan`` against the rules of the action language; raise ``ValueError`` if broken.

    Checks: the forward part is ``Snapshot(0)`` followed only by ``Advance``/``Snapshot`` and ends
    with ``current == length - 1``; the backward part starts with ``StepBackward(length - 1)``;
    every ``Advance`` starts at the current carry and stays inside the scan; ``Snapshot`` stores
    the current index and is not already live; ``Restore``/``Free`` name a live snapshot;
    ``StepBackward`` runs on the current carry, each index exactly once, in descending order; no
    snapshot is live at the end; the live count never exceeds ``plan.snapshots`` and its peak
    equals it; ``plan.evaluations`` matches the ``Advance`` actions. Returns ``None``.
    """
    if not isinstance(plan, Plan):
        raise TypeError(
            f"validate_plan: `plan` must be a Plan, got {plan!r} of type {type(plan).__name__}."
        )
    length = plan.length
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"validate_plan: `plan.length` must be an int >= 0, got {length!r}.")
    where = "validate_plan"
    if length == 0:
        if plan.forward or plan.backward or plan.snapshots or plan.evaluations:
            raise ValueError(
                f"{where}: a plan of length 0 must be empty with snapshots=0 and "
                f"evaluations=0, got {len(plan.forward)} forward and {len(plan.backward)} "
                f"backward actions, snapshots={plan.snapshots}, evaluations={plan.evaluations}."
            )
        return
    if not plan.forward or plan.forward[0] != Snapshot(0):
        first = _short(plan.forward[0]) if plan.forward else "nothing"
        raise ValueError(f"{where}: forward must start with Snapshot(0), got {first}.")
    if not plan.backward or plan.backward[0] != StepBackward(length - 1):
        first = _short(plan.backward[0]) if plan.backward else "nothing"
        raise ValueError(
            f"{where}: backward must start with StepBackward({length - 1}), got {first}."
        )

    # The replay is one flat loop over local variables: it runs on every plan in the tests.
    budget = plan.snapshots
    live: set[int] = set()
    current: int | None = 0
    expected = length - 1  # index of the next StepBackward
    peak = evaluations = 0
    for part, actions in (("forward", plan.forward), ("backward", plan.backward)):
        forward = part == "forward"
        for k, action in enumerate(actions):
            problem = None
            kind = type(action)
            if kind not in _ACTION_TYPES:  # exact types first (fast path), then subclasses
                kind = next((t for t in _ACTION_TYPES if isinstance(action, t)), None)
            if kind is None:
                problem = (
                    "not an action (expected Advance, Snapshot, Restore, Free or StepBackward)."
                )
            elif forward and kind is not Advance and kind is not Snapshot:
                problem = "forward may only contain Advance and Snapshot actions."
            elif kind is Advance:
                start, stop = action.start, action.stop
                if current is None or start != current:
                    problem = f"advance must start at the current carry ({_current(current)})."
                elif not start < stop < length:
                    problem = f"needs start < stop <= {length - 1} (the scan has {length} steps)."
                else:
                    evaluations += stop - start
                    current = stop
            elif not 0 <= (index := action.index) < length:
                problem = f"index outside the scan [0, {length})."
            elif kind is Snapshot:
                if current != index:
                    problem = f"snapshot index must equal the current carry ({_current(current)})."
                elif index in live:
                    problem = f"snapshot {index} is already live."
                else:
                    live.add(index)
                    if len(live) > peak:
                        peak = len(live)
                        if peak > budget:
                            problem = f"{peak} live snapshots exceeds plan.snapshots={budget}."
            elif kind is StepBackward:
                if index != expected:
                    wanted = f"StepBackward({expected})" if expected >= 0 else "no more steps"
                    problem = (
                        f"out of order, expected {wanted} "
                        "(each step is reversed exactly once, in descending order)."
                    )
                elif current != index:
                    problem = f"must run on the current carry ({_current(current)})."
                else:
                    expected -= 1
                    current = None
            elif index not in live:  # Restore or Free
                problem = f"snapshot {index} is not live (live: {_fmt_live(live)})."
            elif kind is Restore:
                current = index
            else:  # Free
                live.remove(index)
            if problem is not None:
                raise ValueError(f"{where}: {part}[{k}] {_short(action)}: {problem}")
        if forward and current != length - 1:
            raise ValueError(
                f"{where}: forward must end with current == {length - 1}, but {_current(current)}."
            )
    if expected >= 0:
        raise ValueError(
            f"{where}: missing StepBackward({expected}); every step must be reversed exactly once."
        )
    if live:
        raise ValueError(
            f"{where}: snapshots still live at the end: {_fmt_live(live)}; "
            "backward must free every snapshot, including 0."
        )
    if peak != budget:
        raise ValueError(
            f"{where}: plan.snapshots={budget} but the peak number of live snapshots is {peak}."
        )
    if evaluations != plan.evaluations:
        raise ValueError(
            f"{where}: plan.evaluations={plan.evaluations} but the Advance "
            f"actions evaluate {evaluations} steps."
        )


def _current(current: int | None) -> str:
    return "undefined after StepBackward" if current is None else f"current is {current}"
