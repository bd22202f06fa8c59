"""Checkpoint policies: how much of a scan to keep for the backward pass.

A policy is a small frozen object; strings are shorthands for them::

    "store_all"  -> StoreAll()            keep every step's graph; no recomputation
    "sqrt"       -> Uniform()             a snapshot every ceil(sqrt(length)) steps
    "binomial"   -> Binomial()            optimal revolve schedule, ceil(log2(length)) snapshots
    "auto"       -> Auto()                the fastest schedule whose snapshots fit a budget

Every policy except :class:`StoreAll` turns into a :class:`fmaml._schedule.Plan` once the scan knows
its length and the size of one carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fmaml._schedule import Plan, binomial_plan, uniform_plan

__all__ = ["Auto", "Binomial", "Policy", "StoreAll", "Uniform", "resolve_policy"]

#: Snapshot budget of the default policy: 64 MiB of carries.
DEFAULT_SNAPSHOT_BYTES = 64 * 2**20


def _check_count(owner: str, name: str, value: object, hint: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: `{name}` must be an int >= 1 or None, got {value!r}. {hint}")


def _log2_snapshots(length: int) -> int:
    return max(1, math.ceil(math.log2(length))) if length > 1 else 1


@dataclass(frozen=True)
class StoreAll:
    """Keep every step's autograd graph: no recomputation, memory linear in the length.

    The fastest policy when memory allows, and the only one that supports forward-mode AD
    (``jvp``, ``jacfwd``): the scan is then a plain Python loop.
    """

    def stores_all(self, length: int) -> bool:
        return True

    def plan(self, length: int, carry_bytes: int) -> None:
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

    def plan(self, length: int, carry_bytes: int) -> Plan:
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

    def plan(self, length: int, carry_bytes: int) -> Plan:
        s = self.snapshots if self.snapshots is not None else _log2_snapshots(length)
        return binomial_plan(length, min(s, max(length, 1)))


@dataclass(frozen=True)
class Auto:
    """The fastest schedule whose snapshots fit a memory budget (the default policy).

    Rule: the scan measures one carry (``carry_bytes``, physical bytes, vmap batches included) and
    takes ``s = min(length, max_snapshots, max_bytes // carry_bytes)`` snapshots, at least one, then
    runs the optimal binomial schedule with ``s`` snapshots. With neither bound given, the budget is
    64 MiB of snapshots, and never fewer than the ``"binomial"`` shorthand's ``ceil(log2(length))``.

    Why: a snapshot is one carry (for MAML, the parameters), usually tens of times smaller than one
    step's autograd graph, and every extra snapshot removes recomputation. Spending a modest, fixed
    budget on snapshots makes short and medium scans nearly as fast as storing every carry (2
    evaluations per step) while memory stops growing with the length once the budget is full;
    beyond it the binomial schedule degrades gracefully (about log(length) evaluations per step).
    Auto keeps no step graphs (:class:`StoreAll`), whose size is unknown before the backward
    pass, with one exception: the default ``Auto()`` runs a scan of length 1 as a plain loop,
    since a checkpointed scan would hold that one step's graph in its backward pass anyway.
    """

    max_snapshots: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        hint = "Leave it None for no bound."
        _check_count("Auto", "max_snapshots", self.max_snapshots, hint)
        _check_count("Auto", "max_bytes", self.max_bytes, hint)

    def snapshots(self, length: int, carry_bytes: int) -> int:
        """The number of snapshots this policy spends on a scan of ``length`` steps."""
        per = max(int(carry_bytes), 1)
        if self.max_snapshots is None and self.max_bytes is None:
            budget = max(DEFAULT_SNAPSHOT_BYTES // per, _log2_snapshots(length))
        else:
            budget = length
            if self.max_snapshots is not None:
                budget = min(budget, self.max_snapshots)
            if self.max_bytes is not None:
                budget = min(budget, self.max_bytes // per)
        return max(1, min(budget, length))

    def stores_all(self, length: int) -> bool:
        """Whether the scan runs as a plain loop: only the default ``Auto()`` at length 1."""
        return length == 1 and self.max_snapshots is None and self.max_bytes is None

    def plan(self, length: int, carry_bytes: int) -> Plan | None:
        if self.stores_all(length):
            return None
        return binomial_plan(length, self.snapshots(length, carry_bytes))


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
