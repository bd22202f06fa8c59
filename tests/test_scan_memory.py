"""Memory of ``fmaml.scan``, measured by counting, not by the clock or RSS.

* Live step graphs: a probe autograd Function inside the step attaches a token to every graph
  node it creates; the tokens count themselves, so the peak number alive at once is the number of
  step graphs held together. ``store_all`` holds all of them (the probe can see retention).
* Snapshots: ``record_scan`` reports the live carries and their bytes; both must match a replay
  of the plan, and stay within the policy's budget.
* Forward mode: no snapshot and no step graph under ``jvp``/``jacfwd`` (counted), the carries of
  reverse mode under forward over reverse, and a peak resident memory that does not grow with
  the length (measured in fresh processes by ``benchmarks/forward_mode.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTED, F64, checkpointed_policies, policy_id, rand
from torch.func import grad, jacfwd, jvp, vmap

import fmaml
from fmaml import _schedule as sch
from fmaml._policy import DEFAULT_BUDGET_BYTES, resolve_policy


class _Token:
    """Counts its live instances; one is attached to every probe graph node."""

    live = 0
    peak = 0

    def __init__(self) -> None:
        _Token.live += 1
        _Token.peak = max(_Token.peak, _Token.live)

    def __del__(self) -> None:
        _Token.live -= 1


class _Probe(torch.autograd.Function):
    """Identity whose context holds a token: alive exactly as long as the step's graph."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.token = _Token()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        return grad_out

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return tangent


@pytest.fixture
def tokens():
    _Token.live = _Token.peak = 0
    yield _Token
    assert _Token.live == 0, "a step graph outlived the scan's backward pass"


def _probed_step(c, x, k):
    c = _Probe.apply(c)
    return torch.tanh(c @ k + x), (c**2).sum()


def _loss(policy, xs):
    def fn(init, k):
        carry, ys = fmaml.scan(_probed_step, init, xs, checkpoint=policy, consts=k)
        return (carry**2).sum() + ys.sum()

    return fn


LENGTH = 12
ALL = ["store_all", *CHECKPOINTED]


def _expected_graph_peak(policy):
    return LENGTH if policy == "store_all" else 1


@pytest.mark.parametrize("policy", ALL, ids=policy_id)
def test_live_step_graphs_under_func_grad(policy, tokens, gen):
    xs, k = rand(gen, LENGTH, 3), rand(gen, 3, 3, scale=0.5)
    g = grad(_loss(policy, xs), argnums=(0, 1))(rand(gen, 3), k)
    assert tokens.peak == _expected_graph_peak(policy)
    assert tokens.live == 0
    assert all(torch.isfinite(t).all() for t in g)


@pytest.mark.parametrize("policy", ALL, ids=policy_id)
def test_live_step_graphs_under_vmap_of_grad(policy, tokens, gen):
    xs, k = rand(gen, 4, LENGTH, 3), rand(gen, 3, 3, scale=0.5)
    g = vmap(grad(lambda i, x, k: _loss(policy, x)(i, k)), in_dims=(0, 0, None))
    g(rand(gen, 4, 3), xs, k)
    assert tokens.peak == _expected_graph_peak(policy)
    assert tokens.live == 0


@pytest.mark.parametrize("policy", ALL, ids=policy_id)
def test_live_step_graphs_under_plain_backward(policy, tokens, gen):
    xs, k = rand(gen, LENGTH, 3), rand(gen, 3, 3, scale=0.5).requires_grad_()
    init = rand(gen, 3).requires_grad_()
    loss = _loss(policy, xs)(init, k)
    # between forward and backward: a checkpointed scan holds no step graph at all
    assert tokens.live == (LENGTH if policy == "store_all" else 0)
    loss.backward()
    del loss
    assert tokens.peak == _expected_graph_peak(policy)
    assert tokens.live == 0
    assert init.grad is not None and k.grad is not None


# --------------------------------------------------------------------------------------------
# snapshots


def _replay(plan: sch.Plan) -> tuple[int, int]:
    """(most carries live at once, most carries held other than the initial one) over the plan.

    A live carry is a snapshot or the working carry; the initial carry is the scan's input.
    """
    live: set[int] = set()
    current, peak_live, peak_held = 0, 0, 0
    for action in (*plan.forward, *plan.backward):
        if isinstance(action, sch.Snapshot):
            live.add(action.index)
        elif isinstance(action, sch.Free):
            live.discard(action.index)
        elif isinstance(action, sch.Restore):
            current = action.index
        elif isinstance(action, sch.Advance):
            current = action.stop
        carries = live | {current}
        peak_live = max(peak_live, len(carries))
        peak_held = max(peak_held, len(carries - {0}))
    return peak_live, peak_held


def _record(policy, init, length, batched=False):
    def step(c, x):
        return {"w": torch.sin(c["w"]) * 1.01 + x, "b": c["b"] * 0.5}, None

    def loss(init, xs):
        carry, _ = fmaml.scan(step, init, xs, checkpoint=policy)
        return carry["w"].sum() + carry["b"].sum()

    xs = torch.ones(length, *init["w"].shape[batched:], dtype=F64)
    with fmaml.record_scan() as stats:
        if batched:
            vmap(grad(loss), in_dims=(0, None))(init, xs)
        else:
            grad(loss)(init, xs)
    return stats


def _init(gen, batch=None):
    shape = (batch,) if batch else ()
    return {"w": rand(gen, *shape, 5), "b": rand(gen, *shape, 2, 2)}


CARRY_BYTES = (5 + 4) * 8


@checkpointed_policies
@pytest.mark.parametrize("length", [1, 2, 3, 10, 33])
def test_snapshot_counts_and_bytes_match_the_plan(policy, length, gen):
    stats = _record(policy, _init(gen), length)
    (choice,) = stats.scans
    expected = resolve_policy(policy).plan(length, CARRY_BYTES, choice.graph_bytes)
    if expected is None:  # Auto keeps the graphs of short scans that fit its budget
        assert isinstance(resolve_policy(policy), fmaml.Auto)
        assert (stats.plans, stats.max_live_snapshots, choice.plan) == ([], 0, None)
        return
    (plan,) = stats.plans
    assert plan == expected
    peak_live, peak_held = _replay(plan)
    assert stats.max_live_snapshots == peak_live
    assert stats.max_held_bytes == peak_held * CARRY_BYTES
    assert stats.max_held_bytes <= stats.max_live_snapshots * CARRY_BYTES
    assert stats.max_live_snapshots <= plan.snapshots + 1


@pytest.mark.parametrize("snapshots", [1, 2, 3, 5])
@pytest.mark.parametrize("length", [4, 20, 50])
def test_binomial_stays_within_its_snapshots(snapshots, length, gen):
    stats = _record(fmaml.Binomial(snapshots), _init(gen), length)
    assert stats.max_live_snapshots <= snapshots + 1
    assert stats.max_held_bytes <= snapshots * CARRY_BYTES
    # and uses what it is given (a policy that ignored `snapshots` would recompute more)
    assert stats.plans[0].snapshots == min(snapshots, length - 1)


def _graph_step(c, x):
    """A step whose graph saves 72 bytes beyond its inputs: sin(w) (5 float64, for the outer sin)
    and cos(b) (4 float64, for the product); sin and cos save their inputs, which are the carry."""
    return {"w": torch.sin(torch.sin(c["w"])) + x, "b": torch.cos(c["b"]) * c["b"]}, None


GRAPH_BYTES = (5 + 4) * 8


def _record_graph(policy, init, length, batched=False, backward=False):
    def loss(init, xs):
        carry, _ = fmaml.scan(_graph_step, init, xs, checkpoint=policy)
        return carry["w"].sum() + carry["b"].sum()

    xs = torch.ones(length, *init["w"].shape[batched:], dtype=F64)
    with fmaml.record_scan() as stats:
        if backward:
            leaves = {n: t.clone().requires_grad_() for n, t in init.items()}
            loss(leaves, xs).backward()
        elif batched:
            vmap(grad(loss), in_dims=(0, None))(init, xs)
        else:
            grad(loss)(init, xs)
    return stats


@pytest.mark.parametrize("route", ["grad", "backward", "vmap"])
def test_auto_measures_one_step_graph(route, gen):
    """Under plain autograd the step's own graph is measured; under torch.func a sample of it,
    scaled by the vmap batch."""
    batch = 4 if route == "vmap" else None
    stats = _record_graph("auto", _init(gen, batch), 6, batch is not None, route == "backward")
    (choice,) = stats.scans
    assert choice.graph_bytes == GRAPH_BYTES * (batch or 1)
    assert choice.keeps_graphs and choice.plan is None
    assert stats.plans == [] and stats.recomputations == 0
    assert stats.graph_evaluations == 6


@pytest.mark.parametrize("route", ["grad", "backward"])
@pytest.mark.parametrize("length", [2, 7, 20])
def test_auto_keeps_graphs_exactly_while_they_fit(route, length, gen):
    # every step's graph holds its own saved tensors and the carry it started from
    need = length * (GRAPH_BYTES + CARRY_BYTES)
    stats = _record_graph(fmaml.Auto(need), _init(gen), length, backward=route == "backward")
    assert stats.scans[0].keeps_graphs and stats.recomputations == 0
    stats = _record_graph(fmaml.Auto(need - 1), _init(gen), length, backward=route == "backward")
    (choice,) = stats.scans
    assert not choice.keeps_graphs
    # the backward holds one step's graph; the rest of the budget buys snapshots
    snapshots = max(1, (need - 1 - GRAPH_BYTES) // CARRY_BYTES)
    assert choice.plan == sch.binomial_plan(length, min(snapshots, length))
    assert stats.max_held_bytes <= need


@pytest.mark.parametrize("carries", [0.5, 1, 3, 3.5, 8])
def test_auto_budget_buys_snapshots(carries, gen):
    budget = int(carries * CARRY_BYTES) + GRAPH_BYTES  # one step graph, then snapshots
    stats = _record_graph(fmaml.Auto(budget_bytes=budget), _init(gen), 20)
    assert stats.max_held_bytes <= budget - GRAPH_BYTES + CARRY_BYTES
    assert stats.plans[0].snapshots == max(1, int(carries))
    assert stats.max_live_snapshots == max(1, int(carries)) + 1


def test_auto_budget_counts_the_vmap_batch(gen):
    batch = 4
    budget = (6 * CARRY_BYTES + GRAPH_BYTES) * batch  # six batched carries and a batched graph
    stats = _record_graph(fmaml.Auto(budget_bytes=budget), _init(gen, batch), 20, batched=True)
    (plan,) = stats.plans
    assert plan.snapshots == 6
    assert stats.max_held_bytes == _replay(plan)[1] * batch * CARRY_BYTES


@pytest.mark.parametrize(
    ("carry_bytes", "graph_bytes", "length"),
    [
        (2**27, 0, 100),
        (2**27, 2**10, 1000),
        (2**15, 0, 100),
        (2**15, 2**16, 700),
        (2**20, 2**20, 100),
        (2**20, 2**20, 64),
        (2**25, 2**23, 5),
        (24, 2**30, 50),
        (24, 0, 50),
    ],
)
def test_default_auto_rule(carry_bytes, graph_bytes, length):
    auto = fmaml.Auto()
    plan = auto.plan(length, carry_bytes, graph_bytes)
    if length * (graph_bytes + carry_bytes) <= DEFAULT_BUDGET_BYTES:
        assert plan is None
        return
    log2 = math.ceil(math.log2(length))
    free = max(DEFAULT_BUDGET_BYTES - graph_bytes, 0)
    snapshots = min(max(free // carry_bytes, log2), length)
    assert plan == sch.binomial_plan(length, snapshots)
    assert plan.snapshots >= min(log2, length - 1)  # never fewer than "binomial"


@pytest.mark.parametrize("snapshots", [1, 2, 3, 7])
@pytest.mark.parametrize("length", [1, 2, 9, 40])
def test_binomial_recomputations_are_optimal(snapshots, length, gen):
    stats = _record(fmaml.Binomial(snapshots), _init(gen), length)
    assert stats.recomputations == fmaml.binomial_cost(length, snapshots) - (length - 1)
    assert stats.forward_evaluations == length
    assert stats.graph_evaluations == length


def test_exact_second_order_recomputes_with_a_graph(tokens, gen):
    # jacrev(grad): the backward differentiates a full recomputation with a graph (store_all's
    # memory, documented), and frees it afterwards.
    xs, k = rand(gen, LENGTH, 3), rand(gen, 3, 3, scale=0.5)
    torch.func.jacrev(grad(_loss(fmaml.Binomial(2), xs)))(rand(gen, 3), k)
    assert tokens.peak >= LENGTH
    assert tokens.live == 0


# --------------------------------------------------------------------------------------------
# the per-step path does not grow with the snapshots held


def _work_between_steps(snapshots: int, length: int, recording: bool) -> int:
    """Python calls (``sys.setprofile`` events) between two consecutive evaluations of the step
    in a ``grad`` of a scan with ``Binomial(snapshots)``: the 99th percentile over the steps (a
    pull-back and its bookkeeping; the one-off work of planning and set-up is left out)."""
    events, marks = [0], []

    def step(c, x):
        marks.append(events[0])
        return {"w": torch.sin(c["w"]) + x}, None

    def count(frame, event, arg):
        events[0] += 1

    init = {"w": torch.ones(3, dtype=F64)}
    xs = torch.ones(length, 3, dtype=F64)

    def loss(init):
        carry, _ = fmaml.scan(step, init, xs, checkpoint=fmaml.Binomial(snapshots))
        return carry["w"].sum()

    context = fmaml.record_scan() if recording else contextlib.nullcontext()
    sys.setprofile(count)
    try:
        with context:
            grad(loss)(init)
    finally:
        sys.setprofile(None)
    gaps = sorted(b - a for a, b in itertools.pairwise(marks))
    return gaps[int(0.99 * (len(gaps) - 1))]


@pytest.mark.parametrize("recording", [False, True])
def test_per_step_work_does_not_grow_with_the_snapshots(recording):
    """Found once: record_scan's bookkeeping re-counted every snapshot at every step, so a scan
    keeping thousands of snapshots spent 7x longer per step. Counted, not timed."""
    few = _work_between_steps(4, 300, recording)
    many = _work_between_steps(200, 300, recording)
    assert many <= 1.1 * few, (few, many)  # 6x when the bookkeeping scaled with the snapshots


# --------------------------------------------------------------------------------------------
# forward mode


@pytest.mark.parametrize("policy", ALL, ids=policy_id)
@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_forward_mode_holds_no_snapshots_and_no_step_graphs(policy, transform, tokens, gen):
    xs, k, init = rand(gen, LENGTH, 3), rand(gen, 3, 3, scale=0.5), rand(gen, 3)
    loss = _loss(policy, xs)
    with fmaml.record_scan() as stats:
        if transform == "jvp":
            _, tangent = jvp(loss, (init, k), (rand(gen, 3), rand(gen, 3, 3)))
        else:
            tangent = jacfwd(loss, argnums=(0, 1))(init, k)
    assert all(torch.isfinite(t).all() for t in (tangent if transform == "jacfwd" else [tangent]))
    assert tokens.peak == 1  # one step alive at a time, nothing kept
    assert (stats.plans, stats.max_live_snapshots, stats.max_held_bytes) == ([], 0, 0)
    assert (stats.graph_evaluations, stats.recomputations) == (0, 0)
    assert stats.tangent_evaluations == stats.forward_evaluations == LENGTH


@pytest.mark.parametrize("policy", ALL, ids=policy_id)
def test_forward_over_reverse_keeps_the_carries_of_reverse_mode(policy, tokens, gen):
    xs, k, init = rand(gen, LENGTH, 3), rand(gen, 3, 3, scale=0.5), rand(gen, 3)
    loss = _loss(policy, xs)
    with fmaml.record_scan() as reverse:
        grad(loss, argnums=(0, 1))(init, k)
    assert tokens.peak == _expected_graph_peak(policy)
    _Token.peak = 0
    with fmaml.record_scan() as stats:
        jvp(grad(loss, argnums=(0, 1)), (init, k), (rand(gen, 3), rand(gen, 3, 3)))
    # one step's graph at a time (store_all: all of them), as many carries as reverse mode
    # (each with its tangent), and one forward-mode pass for the tangents of the outputs
    assert tokens.peak == _expected_graph_peak(policy)
    assert stats.plans == reverse.plans
    assert stats.max_live_snapshots == reverse.max_live_snapshots
    if reverse.plans:
        assert stats.tangent_evaluations == LENGTH
        # the forward pass kept no snapshot: the backward re-took them, with their tangents
        (plan,) = stats.plans
        assert stats.recomputations == reverse.recomputations + plan.length - 1


@pytest.mark.slow
def test_forward_mode_peak_memory_does_not_grow_with_the_length():
    """Peak resident memory of ``jvp`` through a 2,000-step scan within 1.5x of a 200-step one,
    each in a fresh process (``benchmarks/forward_mode.py``, workload ``scan``): a carry of
    256 KiB, so that keeping anything per step (a carry, a tangent, a graph) would add hundreds
    of MB."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks._memory import measure

    carry = 2**15 * 8
    config = {"workload": "scan", "numel": 2**15, "transform": "jvp", "policy": "auto"}
    peaks = {}
    for k in (200, 2000):
        result = measure("forward_mode", {**config, "k": k, "seed": 0, "threads": 1, "warmup": 0})
        assert result["tangent_evaluations"] == k
        assert (result["plans"], result["max_live_snapshots"], result["graph_evaluations"]) == (
            0,
            0,
            0,
        )
        peaks[k] = result["peak_bytes"]
        assert peaks[k] < 32 * carry, f"k={k}: peak {peaks[k] / 2**20:.1f} MiB"
    assert peaks[2000] <= 1.5 * peaks[200], peaks
