"""``fmaml.scan`` values, pytrees, edge lengths, and the exact schedule it runs.

Every value is compared with :func:`conftest.reference_scan`, the loop that defines the scan.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CHECKPOINTED,
    F64,
    all_policies,
    assert_trees_close,
    checkpointed_policies,
    rand,
    reference_scan,
)

import fmaml
from fmaml import _schedule as sch
from fmaml._policy import StoreAll, resolve_policy


def _exact(actual, expected):
    assert_trees_close(actual, expected, rtol=0.0, atol=0.0)


def _plan_for(policy, length: int, carry_bytes: int, stats=None) -> sch.Plan | None:
    """The plan ``policy`` makes; for Auto, from the step graph the scan measured."""
    graph = stats.scans[0].graph_bytes if stats is not None else None
    return resolve_policy(policy).plan(length, carry_bytes, graph)


def _backward_order(plan: sch.Plan) -> list[int]:
    """The step indices the backward evaluates: each Advance's range, each StepBackward."""
    order: list[int] = []
    for action in plan.backward:
        if isinstance(action, sch.Advance):
            order.extend(range(action.start, action.stop))
        elif isinstance(action, sch.StepBackward):
            order.append(action.index)
    return order


# --------------------------------------------------------------------------------------------
# values against the reference loop


def _rnn_step(carry, x, consts):
    h, m = carry["h"], carry["m"]
    u, s = x
    h2 = torch.tanh(h @ consts["W"] + u * s) * consts["lr"]
    m2 = 0.9 * m + 0.1 * torch.outer(h2[:2], h2[:2])
    return {"h": h2, "m": m2}, {"norm": (h2**2).sum(), "h": h2}


@all_policies
@pytest.mark.parametrize("length", [1, 2, 3, 10, 17])
def test_values_match_reference(policy, length, gen):
    init = {"h": rand(gen, 3), "m": rand(gen, 2, 2)}
    xs = (rand(gen, length, 3), rand(gen, length))
    consts = {"W": rand(gen, 3, 3, scale=0.5), "lr": torch.tensor(0.9, dtype=F64)}
    carry, ys = fmaml.scan(_rnn_step, init, xs, checkpoint=policy, consts=consts)
    _exact((carry, ys), reference_scan(_rnn_step, init, xs, consts=consts))
    assert ys["norm"].shape == (length,)
    assert ys["h"].shape == (length, 3)


@all_policies
def test_values_with_requires_grad_inputs_and_no_grad_mode(policy, gen):
    init = rand(gen, 4).requires_grad_()
    xs = rand(gen, 6, 4)

    def f(c, x):
        return torch.sin(c) + x, c.sum()

    expected = reference_scan(f, init, xs)
    carry, ys = fmaml.scan(f, init, xs, checkpoint=policy)
    _exact((carry, ys), expected)
    assert carry.requires_grad and ys.requires_grad
    with torch.no_grad():
        carry, ys = fmaml.scan(f, init, xs, checkpoint=policy)
    _exact((carry, ys), expected)
    assert not carry.requires_grad and not ys.requires_grad


# --------------------------------------------------------------------------------------------
# pytrees


def _nested(c, x):
    a, (b, rest) = c["a"], c["pair"]
    new = {"a": a * x["s"] + b.sum(), "pair": (torch.cos(b) + x["v"], [rest[0] * 0.5, None])}
    return new, (a.sum(), {"b": b})


def _counter(c, x):
    # an integer step counter carried next to a float state; integer ys too
    w, n = c
    return (w * 0.9 + x * n.to(w.dtype), n + 1), {"n": n, "w": w}


def _none_y(c, x):
    return c + x, None


def _scalar_y_tuple(c, x):
    return c * 0.5 + x["a"] - x["b"], (c.sum(), (c.prod(), c[0]))


def _pytree_cases(gen, length):
    return {
        "nested": (
            _nested,
            {"a": rand(gen, 2), "pair": (rand(gen, 3), [rand(gen, 2, 2), None])},
            {"s": rand(gen, length), "v": rand(gen, length, 3)},
        ),
        "counter": (_counter, (rand(gen, 3), torch.tensor(0)), rand(gen, length, 3)),
        "none_y": (_none_y, rand(gen, 2), rand(gen, length, 2)),
        "xs_dict_ys_tuple": (
            _scalar_y_tuple,
            rand(gen, 4),
            {"a": rand(gen, length, 4), "b": rand(gen, length, 4)},
        ),
    }


@all_policies
@pytest.mark.parametrize("case", ["nested", "counter", "none_y", "xs_dict_ys_tuple"])
def test_pytrees_match_reference(policy, case, gen):
    length = 6
    f, init, xs = _pytree_cases(gen, length)[case]
    carry, ys = fmaml.scan(f, init, xs, checkpoint=policy)
    ref_carry, ref_ys = reference_scan(f, init, xs)
    _exact(carry, ref_carry)
    if case == "none_y":
        assert ys is None
    else:
        _exact(ys, ref_ys)


@all_policies
def test_none_stays_in_the_carry_and_int_counter_is_exact(policy, gen):
    init = {"w": rand(gen, 3), "state": None, "step": torch.tensor(0)}

    def f(c, x):
        assert c["state"] is None
        return {"w": c["w"] + x, "state": None, "step": c["step"] + 1}, c["step"]

    carry, ys = fmaml.scan(f, init, rand(gen, 5, 3), checkpoint=policy)
    assert carry["state"] is None
    assert carry["step"].dtype == torch.int64 and int(carry["step"]) == 5
    assert ys.tolist() == [0, 1, 2, 3, 4]


@all_policies
def test_xs_none_with_length(policy, gen):
    def f(c, x):
        assert x is None
        return c * 1.5 - 0.25, c

    init = rand(gen, 2)
    carry, ys = fmaml.scan(f, init, None, length=7, checkpoint=policy)
    _exact((carry, ys), reference_scan(f, init, None, length=7))
    assert ys.shape == (7, 2)


@all_policies
def test_xs_with_matching_length(policy, gen):
    xs = rand(gen, 4, 2)
    init = rand(gen, 2)
    out = fmaml.scan(_none_y, init, xs, length=4, checkpoint=policy)
    _exact(out, fmaml.scan(_none_y, init, xs, checkpoint="store_all"))


# --------------------------------------------------------------------------------------------
# length 0


@all_policies
def test_length_zero_returns_init_and_empty_ys(policy, gen):
    init = {"h": rand(gen, 3).requires_grad_(), "n": torch.tensor(2)}
    xs = {"x": rand(gen, 0, 3), "k": torch.zeros(0, 5, dtype=torch.int32)}

    def f(c, x):
        y = {"h": c["h"] + x["x"], "k": x["k"], "pair": torch.stack([c["h"], c["h"]])}
        return {"h": c["h"] * 2, "n": c["n"] + 1}, y

    carry, ys = fmaml.scan(f, init, xs, checkpoint=policy)
    assert carry is init
    assert ys["h"].shape == (0, 3) and ys["h"].dtype == F64
    assert ys["k"].shape == (0, 5) and ys["k"].dtype == torch.int32
    assert ys["pair"].shape == (0, 2, 3)


@all_policies
def test_length_zero_without_xs(policy, gen):
    init = rand(gen, 2)
    carry, ys = fmaml.scan(lambda c, x: (c + 1, (c, c.sum())), init, length=0, checkpoint=policy)
    assert carry is init
    assert ys[0].shape == (0, 2) and ys[1].shape == (0,)
    carry, ys = fmaml.scan(lambda c, x: (c * 2, None), init, length=0, checkpoint=policy)
    assert carry is init and ys is None


# --------------------------------------------------------------------------------------------
# the schedule that actually runs


class _Recorder:
    """A step that records the index of every evaluation (``int(x)``), in order."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, c, x):
        self.calls.append(int(x))
        return torch.sin(c) * 1.1 + 0.1 * x.to(c.dtype), (c**2).sum()


def _loss(carry, ys):
    return (carry**2).sum() + ys.sum()


@checkpointed_policies
@pytest.mark.parametrize("length", [1, 2, 5, 9, 16])
def test_exact_evaluation_order_plain_backward(policy, length, gen):
    f = _Recorder()
    init = rand(gen, 3).requires_grad_()
    with fmaml.record_scan() as stats:
        carry, ys = fmaml.scan(f, init, torch.arange(length), checkpoint=policy)
        assert f.calls == list(range(length))  # the forward visits every step once, in order
        f.calls.clear()
        _loss(carry, ys).backward()
    plan = _plan_for(policy, length, init.numel() * init.element_size(), stats)
    if plan is None:  # Auto keeps the graphs that fit its budget: no recomputation
        assert isinstance(resolve_policy(policy), fmaml.Auto)
        assert (stats.plans, f.calls, stats.recomputations) == ([], [], 0)
        return
    assert stats.plans == [plan]
    assert f.calls == _backward_order(plan)
    assert stats.forward_evaluations == length
    assert stats.recomputations == plan.evaluations - (length - 1)
    assert stats.graph_evaluations == length
    assert len(f.calls) == stats.recomputations + stats.graph_evaluations


@checkpointed_policies
@pytest.mark.parametrize("length", [3, 12])
def test_exact_evaluation_order_under_func_grad(policy, length, gen):
    f = _Recorder()
    xs = torch.arange(length)

    def loss(init):
        return _loss(*fmaml.scan(f, init, xs, checkpoint=policy))

    init = rand(gen, 3)
    with fmaml.record_scan() as stats:
        torch.func.grad(loss)(init)
    plan = _plan_for(policy, length, 3 * 8, stats)
    # under torch.func, Auto measures its step graph on a sample of step 0 first
    sampled = [0] * stats.sample_evaluations
    assert stats.sample_evaluations == isinstance(resolve_policy(policy), fmaml.Auto)
    assert f.calls == [*sampled, *range(length), *_backward_order(plan)]
    assert stats.plans == [plan]
    assert stats.recomputations == plan.evaluations - (length - 1)


@pytest.mark.parametrize(
    ("policy", "length", "expected"),
    [
        # Snapshot(0), Advance(0,2), Snapshot(2), Advance(2,4) | StepBackward(4), Restore(2),
        # Advance(2,3), StepBackward(3), Restore(2), StepBackward(2), Free(2), Restore(0),
        # Advance(0,1), StepBackward(1), Restore(0), StepBackward(0), Free(0)
        (fmaml.Binomial(2), 5, [4, 2, 3, 2, 0, 1, 0]),
        (fmaml.Uniform(2), 5, [4, 2, 3, 2, 0, 1, 0]),
        (fmaml.Binomial(1), 4, [3, 0, 1, 2, 0, 1, 0]),
        (fmaml.Uniform(1), 4, [3, 2, 1, 0]),
        # snapshots 0 and 4: step 4 is reversed from its snapshot, then [0, 4) is recomputed
        # once keeping 1 and 2, and reversed from them
        (fmaml.Uniform(4), 6, [5, 4, 0, 1, 2, 3, 2, 1, 0]),
    ],
    ids=["Binomial(2)", "Uniform(2)", "Binomial(1)", "Uniform(1)", "Uniform(4)"],
)
def test_exact_evaluation_order_by_hand(policy, length, expected, gen):
    f = _Recorder()
    init = rand(gen, 2).requires_grad_()
    carry, ys = fmaml.scan(f, init, torch.arange(length), checkpoint=policy)
    f.calls.clear()
    _loss(carry, ys).backward()
    assert f.calls == expected


def test_store_all_evaluates_each_step_once(gen):
    f = _Recorder()
    init = rand(gen, 2).requires_grad_()
    with fmaml.record_scan() as stats:
        carry, ys = fmaml.scan(f, init, torch.arange(6), checkpoint="store_all")
        _loss(carry, ys).backward()
    assert f.calls == list(range(6))
    assert (stats.forward_evaluations, stats.recomputations, stats.graph_evaluations) == (6, 0, 6)
    assert stats.plans == []


def test_record_scan_nests_and_stops_recording(gen):
    f = _Recorder()
    init = rand(gen, 2).requires_grad_()
    with fmaml.record_scan() as outer:
        with fmaml.record_scan() as inner:
            _loss(*fmaml.scan(f, init, torch.arange(5), checkpoint=fmaml.Binomial(1))).backward()
        _loss(*fmaml.scan(f, init, torch.arange(3), checkpoint=fmaml.Binomial(1))).backward()
    _loss(*fmaml.scan(f, init, torch.arange(4), checkpoint=fmaml.Binomial(1))).backward()
    assert inner.forward_evaluations == 5 and inner.recomputations == 6
    assert outer.forward_evaluations == 8 and outer.recomputations == 6 + 1
    assert [p.length for p in inner.plans] == [5]
    assert [p.length for p in outer.plans] == [5, 3]


def test_default_policy_is_auto(gen):
    # The default `checkpoint` is "auto": same plan as passing it explicitly.
    f = _Recorder()
    init = rand(gen, 2).requires_grad_()
    with fmaml.record_scan() as default:
        _loss(*fmaml.scan(f, init, torch.arange(9))).backward()
    with fmaml.record_scan() as auto:
        _loss(*fmaml.scan(f, init, torch.arange(9), checkpoint=fmaml.Auto())).backward()
    assert default.scans == auto.scans
    assert default.scans[0].policy == fmaml.Auto() and len(default.scans) == 1


def test_policy_shorthands():
    assert resolve_policy("store_all") == StoreAll()
    assert resolve_policy("sqrt") == fmaml.Uniform()
    assert resolve_policy("binomial") == fmaml.Binomial()
    assert resolve_policy("auto") == fmaml.Auto()
    # "sqrt" snapshots every ceil(sqrt(length)) steps, "binomial" takes ceil(log2(length)).
    assert fmaml.Uniform().plan(100, 8) == sch.uniform_plan(100, 10)
    assert fmaml.Uniform().plan(101, 8) == sch.uniform_plan(101, 11)
    assert fmaml.Binomial().plan(100, 8) == sch.binomial_plan(100, 7)
    assert fmaml.Binomial().plan(64, 8) == sch.binomial_plan(64, 6)
    for policy in CHECKPOINTED:
        plan = resolve_policy(policy).plan(1, 8)
        assert plan.length == 1 and not resolve_policy(policy).stores_all(1)
    # the default Auto runs a length-1 scan as a plain loop, before measuring anything
    assert fmaml.Auto().plan(1, 8) is None and fmaml.Auto().stores_all(1)
