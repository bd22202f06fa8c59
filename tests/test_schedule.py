"""Tests for the checkpointing planner ``fmaml._schedule`` (pure Python, no torch needed)."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmaml._schedule import (
    Advance,
    Free,
    Plan,
    Restore,
    Snapshot,
    StepBackward,
    binomial_cost,
    binomial_plan,
    uniform_plan,
    validate_plan,
)

MAX_L = 200
MAX_C = 10


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


@functools.cache
def brute_force(length: int, slots: int) -> int:
    """F(l, c) = min over every split m of m + F(l - m, c - 1) + F(m, c): plain DP, no tricks."""
    if length <= 1:
        return 0
    if slots == 1:
        return sum(range(length))  # reverse step i after advancing i steps from the start
    return min(
        m + brute_force(length - m, slots - 1) + brute_force(m, slots) for m in range(1, length)
    )


def split_cost(length: int, slots: int, m: int) -> int:
    return m + brute_force(length - m, slots - 1) + brute_force(m, slots)


def uniform_closed_form(length: int, every: int) -> tuple[int, int]:
    """(evaluations, snapshots) of ``uniform_plan`` as documented in its docstring."""
    if length == 0:
        return 0, 0
    if length == 1:
        return 0, 1
    k = (length - 2) // every
    last = length - k * every
    return 2 * length - 3 - k, k + max(1, last - 2, every - 2 if k >= 1 else 0)


def replay(plan: Plan) -> tuple[list[int], int, int]:
    """A second, minimal simulator: the StepBackward order, peak live count and evaluations."""
    order: list[int] = []
    live: set[int] = set()
    peak = evaluations = 0
    for action in plan.forward + plan.backward:
        if isinstance(action, Advance):
            evaluations += action.stop - action.start
        elif isinstance(action, Snapshot):
            live.add(action.index)
            peak = max(peak, len(live))
        elif isinstance(action, Free):
            live.discard(action.index)
        elif isinstance(action, StepBackward):
            order.append(action.index)
    return order, peak, evaluations


def check_structure(plan: Plan, length: int) -> None:
    """Conventions that hold for every plan, checked without ``validate_plan``."""
    assert plan.length == length
    if length == 0:
        assert plan.forward == plan.backward == ()
        assert plan.snapshots == plan.evaluations == 0
        return
    assert plan.forward[0] == Snapshot(0)
    assert all(isinstance(a, Advance | Snapshot) for a in plan.forward)
    current = 0
    for action in plan.forward:
        if isinstance(action, Advance):
            assert action.start == current
            current = action.stop
    assert current == length - 1
    assert plan.backward[0] == StepBackward(length - 1)
    assert plan.backward[-1] == Free(0)
    order, peak, evaluations = replay(plan)
    assert order == list(range(length - 1, -1, -1))
    assert peak == plan.snapshots
    assert evaluations == plan.evaluations


# --------------------------------------------------------------------------------------------
# Binomial schedule
# --------------------------------------------------------------------------------------------


def test_cost_matches_brute_force_dp():
    for slots in range(1, MAX_C + 1):
        for length in range(MAX_L + 1):
            assert binomial_cost(length, slots) == brute_force(length, slots), (length, slots)


def test_plan_is_optimal_valid_and_within_budget():
    for slots in range(1, MAX_C + 1):
        for length in range(MAX_L + 1):
            plan = binomial_plan(length, slots)
            validate_plan(plan)
            assert plan.evaluations == brute_force(length, slots), (length, slots)
            assert plan.snapshots <= slots
            # The optimal schedule uses the whole budget: every slot, or every carry but the last.
            assert plan.snapshots == (min(slots, length - 1) if length > 1 else length)


def test_cost_is_convex_in_length_and_in_split():
    """The binary search for the split relies on both convexities; check them on the DP."""
    for slots in range(1, MAX_C + 1):
        diffs = [brute_force(n + 1, slots) - brute_force(n, slots) for n in range(1, MAX_L)]
        assert all(a <= b for a, b in itertools.pairwise(diffs)), slots
    for slots in range(2, MAX_C + 1):
        for length in range(3, MAX_L + 1):
            costs = [split_cost(length, slots, m) for m in range(1, length)]
            steps = [b - a for a, b in itertools.pairwise(costs)]
            assert all(a <= b for a, b in itertools.pairwise(steps)), (length, slots)


def test_structure_on_grid():
    for slots in (1, 2, 3, 5, 8):
        for length in range(60):
            check_structure(binomial_plan(length, slots), length)


@pytest.mark.parametrize("length", [1, 2, 3, 10, 57, 200, 1000])
def test_single_snapshot_is_quadratic(length):
    plan = binomial_plan(length, 1)
    validate_plan(plan)
    assert plan.evaluations == binomial_cost(length, 1) == length * (length - 1) // 2
    assert plan.snapshots == 1
    assert sum(isinstance(a, Restore) for a in plan.backward) == length - 1


@pytest.mark.parametrize("length", [1, 2, 3, 10, 57, 200])
@pytest.mark.parametrize("extra", [-1, 0, 1, 50])
def test_enough_snapshots_store_everything(length, extra):
    slots = max(length + extra, 1)
    plan = binomial_plan(length, slots)
    validate_plan(plan)
    assert plan.evaluations == binomial_cost(length, slots) == length - 1
    assert plan.snapshots == max(length - 1, 1)  # carry length - 1 is current, never stored
    # One sweep forward, no recomputation at all.
    assert all(isinstance(a, StepBackward | Restore | Free) for a in plan.backward)


def test_small_plan_exact_actions():
    # F(4, 2) = 4 is attained by m = 1 and m = 2; the planner takes the smallest optimal split.
    plan = binomial_plan(4, 2)
    assert plan.forward == (Snapshot(0), Advance(0, 1), Snapshot(1), Advance(1, 3))
    assert plan.backward == (
        StepBackward(3),
        Restore(1),
        Advance(1, 2),
        StepBackward(2),
        Restore(1),
        StepBackward(1),
        Free(1),
        Restore(0),
        StepBackward(0),
        Free(0),
    )
    assert (plan.snapshots, plan.evaluations) == (2, 4) == (2, binomial_cost(4, 2))


def test_known_revolve_values():
    # t = 1, 2, 3 boundaries of beta(c, t) = C(c + t, c) for c = 3: l = 4, 10, 20.
    lengths = (4, 5, 10, 11, 20, 21)
    assert [binomial_cost(n, 3) for n in lengths] == [3, 5, 15, 18, 45, 49]
    assert [brute_force(n, 3) for n in lengths] == [3, 5, 15, 18, 45, 49]
    assert binomial_cost(0, 5) == 0


def test_plans_are_cached_and_immutable():
    assert binomial_plan(300, 7) is binomial_plan(300, 7)
    assert binomial_plan(30, 100) is binomial_plan(30, 31)  # clamped to the length
    assert uniform_plan(50, 5) is uniform_plan(50, 5)
    assert uniform_plan(20, 19) is uniform_plan(20, 1000)  # every >= length - 1: one segment
    plan = binomial_plan(30, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.snapshots = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.forward[0].index = 3  # type: ignore[misc]
    assert isinstance(plan.forward, tuple) and isinstance(plan.backward, tuple)
    assert not hasattr(plan.forward[0], "__dict__")  # slotted actions


def test_large_plans_build_and_are_optimal():
    for length, slots in ((10_000, 14), (10_000, 150)):
        plan = binomial_plan(length, slots)
        assert plan.evaluations == binomial_cost(length, slots)
        assert plan.snapshots == slots
        validate_plan(plan)


def test_very_long_plan_has_no_recursion_limit():
    plan = binomial_plan(100_000, 17)
    assert plan.evaluations == binomial_cost(100_000, 17)
    assert plan.snapshots == 17
    assert plan.backward[0] == StepBackward(99_999) and plan.backward[-1] == Free(0)


def test_describe():
    text = binomial_plan(10, 3).describe()
    lines = text.splitlines()
    assert len(lines) >= 4
    assert "length 10" in text
    assert "3 live" in text
    assert f"{binomial_cost(10, 3)} (1.500 per step" in text
    assert "Snapshot(0), Advance(0, 4)" in text
    assert "(none)" in binomial_plan(0, 3).describe()
    assert "evaluations=15" in repr(binomial_plan(10, 3))  # compact repr, no action dump


# --------------------------------------------------------------------------------------------
# Uniform schedule
# --------------------------------------------------------------------------------------------


def test_uniform_closed_forms():
    for length in range(MAX_L + 1):
        for every in range(1, 31):
            plan = uniform_plan(length, every)
            validate_plan(plan)
            assert (plan.evaluations, plan.snapshots) == uniform_closed_form(length, every), (
                length,
                every,
            )


def test_uniform_structure_on_grid():
    for every in (1, 2, 3, 7):
        for length in range(40):
            check_structure(uniform_plan(length, every), length)


@pytest.mark.parametrize("length", [2, 3, 10, 99])
def test_uniform_every_one_stores_all(length):
    plan = uniform_plan(length, 1)
    assert plan.forward == (
        Snapshot(0),
        *(a for i in range(1, length - 1) for a in (Advance(i - 1, i), Snapshot(i))),
        Advance(length - 2, length - 1),
    )
    assert plan.snapshots == length - 1
    assert plan.evaluations == length - 1 == binomial_cost(length, length)


def test_uniform_exact_actions():
    plan = uniform_plan(7, 3)
    assert plan.forward == (Snapshot(0), Advance(0, 3), Snapshot(3), Advance(3, 6))
    assert plan.backward == (
        StepBackward(6),
        Restore(3),
        Advance(3, 4),
        Snapshot(4),
        Advance(4, 5),
        StepBackward(5),
        Restore(4),
        StepBackward(4),
        Free(4),
        Restore(3),
        StepBackward(3),
        Free(3),
        Restore(0),
        Advance(0, 1),
        Snapshot(1),
        Advance(1, 2),
        StepBackward(2),
        Restore(1),
        StepBackward(1),
        Free(1),
        Restore(0),
        StepBackward(0),
        Free(0),
    )
    assert (plan.evaluations, plan.snapshots) == uniform_closed_form(7, 3) == (10, 3)


def test_uniform_is_never_better_than_binomial_with_its_snapshots():
    for length in range(1, 120):
        for every in (1, 2, 5, 11):
            plan = uniform_plan(length, every)
            assert plan.evaluations >= binomial_cost(length, plan.snapshots)


# --------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(length=st.integers(0, 500), slots=st.integers(1, 40))
def test_binomial_properties(length, slots):
    plan = binomial_plan(length, slots)
    validate_plan(plan)
    check_structure(plan, length)
    assert plan.evaluations == binomial_cost(length, slots)
    assert plan.snapshots == (min(slots, length - 1) if length > 1 else length)
    # More snapshots never cost more; the cost is at least one forward sweep.
    assert binomial_cost(length, slots + 1) <= plan.evaluations
    assert plan.evaluations >= max(length - 1, 0)
    if length <= MAX_L and slots <= MAX_C:
        assert plan.evaluations == brute_force(length, slots)


@settings(max_examples=150, deadline=None)
@given(length=st.integers(0, 500), every=st.integers(1, 600))
def test_uniform_properties(length, every):
    plan = uniform_plan(length, every)
    validate_plan(plan)
    check_structure(plan, length)
    assert (plan.evaluations, plan.snapshots) == uniform_closed_form(length, every)


# --------------------------------------------------------------------------------------------
# validate_plan on broken plans
# --------------------------------------------------------------------------------------------


def _broken(plan: Plan, **changes) -> Plan:
    return dataclasses.replace(plan, **changes)


def test_validate_rejects_dropped_step_backward():
    plan = binomial_plan(6, 2)
    index = plan.backward.index(StepBackward(2))
    backward = plan.backward[:index] + plan.backward[index + 1 :]
    with pytest.raises(
        ValueError, match=r"StepBackward\(1\): out of order, expected StepBackward\(2\)"
    ):
        validate_plan(_broken(plan, backward=backward))


def test_validate_rejects_missing_tail():
    plan = uniform_plan(4, 4)
    backward = tuple(a for a in plan.backward if a != StepBackward(0))
    with pytest.raises(ValueError, match=r"missing StepBackward\(0\)"):
        validate_plan(_broken(plan, backward=backward))


def test_validate_rejects_restore_of_freed_snapshot():
    plan = binomial_plan(4, 2)
    index = plan.backward.index(Free(1))
    backward = (*plan.backward[: index + 1], Restore(1), *plan.backward[index + 1 :])
    with pytest.raises(ValueError, match=r"backward\[7\] Restore\(1\): snapshot 1 is not live"):
        validate_plan(_broken(plan, backward=backward))


def test_validate_rejects_advance_from_wrong_index():
    plan = binomial_plan(4, 2)
    forward = (Snapshot(0), Advance(0, 2), Snapshot(2), Advance(1, 3))
    with pytest.raises(ValueError, match=r"Advance\(1, 3\): advance must start at the current"):
        validate_plan(_broken(plan, forward=forward))
    # After a StepBackward the current carry is undefined until a Restore.
    backward = (StepBackward(3), Advance(3, 3), *plan.backward[1:])
    with pytest.raises(ValueError, match="undefined after StepBackward"):
        validate_plan(_broken(plan, backward=backward))


def test_validate_rejects_snapshot_of_wrong_index():
    plan = binomial_plan(4, 2)
    forward = (Snapshot(0), Advance(0, 2), Snapshot(1), Advance(2, 3))
    with pytest.raises(ValueError, match=r"Snapshot\(1\): snapshot index must equal the current"):
        validate_plan(_broken(plan, forward=forward))


def test_validate_rejects_leaked_snapshot():
    plan = binomial_plan(5, 3)
    with pytest.raises(ValueError, match=r"snapshots still live at the end: \[0\]"):
        validate_plan(_broken(plan, backward=plan.backward[:-1]))


def test_validate_rejects_wrong_counters():
    plan = binomial_plan(10, 3)
    with pytest.raises(ValueError, match=r"3 live snapshots exceeds plan\.snapshots=2"):
        validate_plan(_broken(plan, snapshots=2))
    with pytest.raises(ValueError, match=r"plan\.snapshots=4 but the peak"):
        validate_plan(_broken(plan, snapshots=4))
    with pytest.raises(
        ValueError, match=r"plan.evaluations=14 but the Advance actions evaluate 15"
    ):
        validate_plan(_broken(plan, evaluations=14))


def test_validate_rejects_bad_shape():
    plan = binomial_plan(4, 2)
    with pytest.raises(ValueError, match=r"forward must start with Snapshot\(0\)"):
        validate_plan(_broken(plan, forward=plan.forward[1:]))
    with pytest.raises(ValueError, match=r"forward may only contain Advance and Snapshot"):
        validate_plan(_broken(plan, forward=(*plan.forward[:2], Free(0), *plan.forward[2:])))
    with pytest.raises(ValueError, match="forward must end with current == 3, but current is 1"):
        validate_plan(_broken(plan, forward=plan.forward[:-1]))
    with pytest.raises(ValueError, match=r"backward must start with StepBackward\(3\)"):
        validate_plan(_broken(plan, backward=plan.backward[1:]))
    with pytest.raises(ValueError, match="a plan of length 0 must be empty"):
        validate_plan(_broken(binomial_plan(0, 1), evaluations=1))
    with pytest.raises(TypeError, match="`plan` must be a Plan"):
        validate_plan("plan")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------------


def test_bad_snapshots():
    with pytest.raises(
        ValueError,
        match=r"binomial_plan: `snapshots` must be an int >= 1, got 0\. Pass at least one "
        r"snapshot \(the initial carry counts as one\)\.",
    ):
        binomial_plan(10, 0)
    with pytest.raises(ValueError, match=r"binomial_cost: `snapshots` must be an int >= 1, got -2"):
        binomial_cost(10, -2)
    with pytest.raises(TypeError, match=r"`snapshots` must be an int >= 1, got 2\.5 of type float"):
        binomial_plan(10, 2.5)  # type: ignore[arg-type]


def test_bad_length():
    with pytest.raises(ValueError, match=r"binomial_plan: `length` must be an int >= 0, got -1\."):
        binomial_plan(-1, 3)
    with pytest.raises(TypeError, match=r"uniform_plan: `length` must be an int >= 0, got True of"):
        uniform_plan(True, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"binomial_cost: `length` must be an int >= 0, got '5'"):
        binomial_cost("5", 3)  # type: ignore[arg-type]


def test_bad_every():
    with pytest.raises(ValueError, match=r"uniform_plan: `every` must be an int >= 1, got 0\."):
        uniform_plan(10, 0)
    with pytest.raises(TypeError, match=r"uniform_plan: `every` must be an int >= 1, got None"):
        uniform_plan(10, None)  # type: ignore[arg-type]


def test_index_like_ints_are_accepted():
    class Index:
        def __index__(self) -> int:
            return 12

    assert binomial_plan(Index(), 3) is binomial_plan(12, 3)  # type: ignore[arg-type]
    assert uniform_plan(12, Index()) is uniform_plan(12, 11)  # type: ignore[arg-type]
