"""Checkpoint policies: how much of a scan to keep for the backward pass.

A policy is a small frozen object; strings are shorthands for them::

    "store_all"  -> StoreAll()            keep every step's graph; no recomputation
    "sqrt"       -> Uniform()             a snapshot every ceil(sqrt(length)) steps
    "binomial"   -> Binomial()            optimal revolve schedule, ceil(log2(length)) snapshots
    "auto"       -> Auto()                keep every graph if they fit a budget, else checkpoint

Every policy except :class:`StoreAll` turns into a :class:`fmaml._schedule.Plan` once the scan knows
its length and the size of one carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fmaml._schedule import Plan, binomial_plan, uniform_plan

__all__ = ["Auto", "Binomial", "Policy", "StoreAll", "Uniform", "resolve_policy"]

#: Memory budget of the default policy: 64 MiB of graphs and snapshots.
DEFAULT_BUDGET_BYTES = 64 * 2**20


def _check_count(owner: str, name: str, value: object, hint: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: `{name}` must be an int >= 1 or None, got {value!r}. {hint}")


def _check_bytes(owner: str, name: str, value: object) -> None:
    """A byte budget: None, or a finite number >= 1 (``2**30``, ``1e9``)."""
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 1:
        raise ValueError(
            f"{owner}: `{name}` must be a number of bytes >= 1 (e.g. 2**30 for 1 GiB) or None for "
            f"the default, got {value!r}."
        )


def _log2_snapshots(length: int) -> int:
    return max(1, math.ceil(math.log2(length))) if length > 1 else 1


@dataclass(frozen=True)
class StoreAll:
    """Keep every step's autograd graph: no recomputation, memory linear in the length.

    The fastest policy when memory allows: the scan is then a plain Python loop.
    """

    def stores_all(self, length: int) -> bool:
        return True

    def plan(self, length: int, carry_bytes: int, graph_bytes: int | None = None) -> None:
        return None


@dataclass(frozen=True)
class Uniform:
    """Snapshot the carry every ``every`` steps; recompute each segment once in the backward pass.

    Memory: ``ceil(length / every)`` snapshots plus up to ``every - 1`` carries of the segment being
    reversed. Step evaluations: about ``2 * length`` (the forward sweep and one recomputation), plus
    ``length`` evaluations with a graph. ``every=None`` means ``ceil(sqrt(length))`` (the ``"sqrt"``
    shorthand), which minimises the carries held at once.

    Example:
        >>> fmaml.scan(f, init, xs, checkpoint=fmaml.Uniform(every=10))  # doctest: +SKIP
    """

    every: int | None = None

    def __post_init__(self) -> None:
        _check_count(
            "Uniform", "every", self.every, "Pass every=None for ceil(sqrt(length)) steps."
        )

    def stores_all(self, length: int) -> bool:
        return False

    def plan(self, length: int, carry_bytes: int, graph_bytes: int | None = None) -> Plan:
        every = self.every if self.every is not None else max(1, math.isqrt(length - 1) + 1)
        return uniform_plan(length, min(every, max(length, 1)))


@dataclass(frozen=True)
class Binomial:
    """The optimal Griewank-Walther (revolve) schedule with ``snapshots`` carry snapshots.

    With ``s`` snapshots (the initial carry counts as one) and ``t`` the least integer with
    ``C(s + t, s) >= length``, the schedule evaluates ``t * length - C(s + t, t - 1)`` steps without
    a graph, the fewest possible (Griewank and Walther, 2000), plus ``length`` with a graph.
    ``snapshots=None`` means ``ceil(log2(length))`` (the ``"binomial"`` shorthand).
    """

    snapshots: int | None = None

    def __post_init__(self) -> None:
        _check_count(
            "Binomial",
            "snapshots",
            self.snapshots,
            "The initial carry counts as one snapshot, so 1 is the least; "
            "None picks ceil(log2(length)).",
        )

    def stores_all(self, length: int) -> bool:
        return False

    def plan(self, length: int, carry_bytes: int, graph_bytes: int | None = None) -> Plan:
        s = self.snapshots if self.snapshots is not None else _log2_snapshots(length)
        return binomial_plan(length, min(s, max(length, 1)))


@dataclass(frozen=True)
class Auto:
    """Keep every step's graph when they fit a memory budget; otherwise checkpoint (the default).

    Rule: the scan measures one step's autograd graph (``graph_bytes``: the tensors it saves for
    the backward pass, physical bytes, vmap batches included; see ``fmaml._footprint``) and one
    carry (``carry_bytes``). If ``length * (graph_bytes + carry_bytes) <= budget_bytes`` (each
    graph holds the carry its step started from), every graph is kept, as :class:`StoreAll`
    does: no recomputation. Otherwise the backward pass holds one step's graph
    and ``s = (budget_bytes - graph_bytes) // carry_bytes`` carry snapshots (at least
    ``ceil(log2(length))`` with the default budget, at least one with an explicit one, at most
    ``max_snapshots``) and runs the optimal binomial schedule with ``s`` snapshots.

    Why: a short unroll's graphs usually fit, and keeping them is the fastest schedule (one
    evaluation of each step). A snapshot is one carry (for MAML, the parameters), usually tens of
    times smaller than a step's graph, so beyond the budget every extra snapshot removes
    recomputation: about 2 evaluations per step while the snapshots cover the length, then
    ``log(length)`` growth. Memory stops growing with the length once the budget is full.

    Args:
        budget_bytes: the bytes of graphs and snapshots the scan may hold at once (default
            64 MiB).
        max_snapshots: an upper bound on the snapshots; when given, graphs are kept only if
            ``length <= max_snapshots``.
        graph_bytes: the bytes one step's graph saves for one element of the ``vmap``
            batches, when known (:class:`fmaml.MAML` measures it once per shape); the scan then
            scales it by its batch instead of measuring step 0.

    Example:
        >>> fmaml.scan(f, init, xs, checkpoint=fmaml.Auto(budget_bytes=2**30))  # doctest: +SKIP
    """

    budget_bytes: int | None = None
    max_snapshots: int | None = None
    graph_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_bytes("Auto", "budget_bytes", self.budget_bytes)
        _check_count("Auto", "max_snapshots", self.max_snapshots, "Leave it None for no bound.")
        if self.graph_bytes is not None and (
            isinstance(self.graph_bytes, bool)
            or not isinstance(self.graph_bytes, int)
            or self.graph_bytes < 0
        ):
            raise ValueError(
                f"Auto: `graph_bytes` must be an int >= 0 or None (measured), got "
                f"{self.graph_bytes!r}."
            )

    @property
    def budget(self) -> int:
        """The budget in bytes (the default when ``budget_bytes`` is None)."""
        return DEFAULT_BUDGET_BYTES if self.budget_bytes is None else int(self.budget_bytes)

    def keeps_graphs(self, length: int, carry_bytes: int, graph_bytes: int | None) -> bool:
        """Whether a scan of ``length`` steps keeps every step's graph: each holds
        ``graph_bytes`` and the carry it started from."""
        if graph_bytes is None:
            return False
        if self.max_snapshots is not None and length > self.max_snapshots:
            return False
        return length * (graph_bytes + carry_bytes) <= self.budget

    def snapshots(self, length: int, carry_bytes: int, graph_bytes: int | None = 0) -> int:
        """The number of snapshots this policy spends when it checkpoints ``length`` steps."""
        free = self.budget - (graph_bytes or 0)
        count = max(free, 0) // max(int(carry_bytes), 1)
        if self.budget_bytes is None:
            count = max(count, _log2_snapshots(length))
        if self.max_snapshots is not None:
            count = min(count, self.max_snapshots)
        return max(1, min(count, length))

    def stores_all(self, length: int) -> bool:
        """Whether a scan keeps every graph before measuring anything: the default ``Auto()``
        at length 1 (a checkpointed scan would hold that step's graph in its backward anyway)."""
        return length == 1 and self.max_snapshots is None and self.budget_bytes is None

    def plan(self, length: int, carry_bytes: int, graph_bytes: int | None = None) -> Plan | None:
        """The checkpointing plan, or None when every graph is kept."""
        if self.stores_all(length) or self.keeps_graphs(length, carry_bytes, graph_bytes):
            return None
        return binomial_plan(length, self.snapshots(length, carry_bytes, graph_bytes))


Policy = StoreAll | Uniform | Binomial | Auto

_SHORTHANDS = {
    "store_all": StoreAll(),
    "sqrt": Uniform(),
    "binomial": Binomial(),
    "auto": Auto(),
}


def resolve_policy(checkpoint: object, owner: str = "fmaml.scan") -> Policy:
    """The policy object behind ``checkpoint`` (a policy or one of its string shorthands)."""
    if isinstance(checkpoint, StoreAll | Uniform | Binomial | Auto):
        return checkpoint
    if isinstance(checkpoint, str) and checkpoint in _SHORTHANDS:
        return _SHORTHANDS[checkpoint]
    raise ValueError(
        f"{owner}: unknown `checkpoint` {checkpoint!r}. Expected one of "
        f"{', '.join(repr(k) for k in _SHORTHANDS)} or a policy object "
        "(fmaml.StoreAll(), fmaml.Uniform(every=n), fmaml.Binomial(snapshots=s), fmaml.Auto(...))."
    )
