"""``compile=`` on ``fmaml.scan`` and ``fmaml.MAML``: exact, bounded, never silently worse.

Most tests compile with ``backend="eager"`` (dynamo traces, the graph runs eager kernels): they
test fmaml's mechanism (peeling the transforms, the per-structure cache, the traced pytrees, the
compiled pull-back, the fallback) at a fraction of inductor's compile time, and their results
must equal the eager scan's to round-off. Inductor itself (code generation, float64 numerics,
``fallback_random`` for dropout) is tested once, on a tiny model, in the ``slow`` tests at the
end. Compiled pieces are cached by structure, so the tests share them: every test of a step
function after its first reuses what the first compiled.
"""

from __future__ import annotations

import warnings

import optree
import pytest
import torch
import torch.nn.functional as F
from _models import single_thread  # noqa: F401 (autouse fixture)
from conftest import F64, assert_trees_close, policy_id, rand, reference_scan
from torch import nn
from torch._dynamo.utils import counters
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import fmaml
from fmaml._compile import compile_stats, resolve_compile

EAGER = {"backend": "eager"}
TOL = {"rtol": 1e-12, "atol": 1e-12}
POLICIES = ["store_all", "binomial", fmaml.Uniform(2), "auto", fmaml.Auto(budget_bytes=1)]
policies = pytest.mark.parametrize("policy", POLICIES, ids=policy_id)


def _step(carry, x, consts):
    h = torch.tanh(carry["h"] @ consts["A"] + x) * consts["lr"]
    return {"h": h, "n": carry["n"] + 1}, {"loss": (h**2).sum(), "h": h}


def _inputs(gen, batch=()):
    init = {"h": rand(gen, *batch, 3, scale=0.5), "n": torch.tensor(0)}
    xs = rand(gen, 5, 3, scale=0.5)
    consts = {"A": rand(gen, 3, 3, scale=0.5), "lr": torch.tensor(0.9, dtype=F64)}
    return init, xs, consts


def _loss(policy, compile=EAGER):
    def loss(h0, xs, consts):
        init = {"h": h0, "n": torch.tensor(0)}
        if policy is None:
            carry, ys = reference_scan(_step, init, xs, consts=consts)
        else:
            carry, ys = fmaml.scan(
                _step, init, xs, checkpoint=policy, consts=consts, compile=compile
            )
        return (carry["h"] ** 3).sum() + ys["loss"].sum() + torch.sin(ys["h"]).sum()

    return loss


def _twice(fn, *args):
    """Call twice: a structure's first call runs eagerly (validation), the second compiled."""
    fn(*args)
    return fn(*args)


# --------------------------------------------------------------------------------------------
# exact: compiled equals the reference loop, every policy, every transform


@policies
def test_grad(policy, gen):
    init, xs, consts = _inputs(gen)
    with compile_stats() as stats:
        got = _twice(grad(_loss(policy), argnums=(0, 1, 2)), init["h"], xs, consts)
    want = grad(_loss(None), argnums=(0, 1, 2))(init["h"], xs, consts)
    assert_trees_close(got, want, **TOL)
    assert stats.calls > 0 and not stats.failures


@policies
def test_vmap_of_grad(policy, gen):
    init, xs, consts = _inputs(gen, batch=(4,))
    fn = vmap(grad(_loss(policy), argnums=(0, 2)), in_dims=(0, None, None))
    with compile_stats() as stats:
        got = _twice(fn, init["h"], xs, consts)
    want = vmap(grad(_loss(None), argnums=(0, 2)), in_dims=(0, None, None))(init["h"], xs, consts)
    assert_trees_close(got, want, **TOL)
    assert stats.calls > 0 and not stats.failures


@policies
def test_grad_of_vmap(policy, gen):
    init, xs, consts = _inputs(gen, batch=(4,))

    def batched(loss):
        return lambda h, c: vmap(loss, in_dims=(0, None, None))(h, xs, c).sum()

    got = _twice(grad(batched(_loss(policy)), argnums=(0, 1)), init["h"], consts)
    want = grad(batched(_loss(None)), argnums=(0, 1))(init["h"], consts)
    assert_trees_close(got, want, **TOL)


@policies
def test_backward(policy, gen):
    init, xs, consts = _inputs(gen)

    def run(policy):
        h = init["h"].clone().requires_grad_()
        a = consts["A"].clone().requires_grad_()
        _loss(policy)(h, xs, {**consts, "A": a}).backward()
        return h.grad, a.grad

    with compile_stats() as stats:
        got = _twice(run, policy)
    assert_trees_close(got, run(None), **TOL)
    assert stats.calls > 0 and not stats.failures


@pytest.mark.parametrize("policy", ["store_all", "binomial"])
def test_second_order_stays_exact(policy, gen):
    """A derivative of the gradient runs the eager, graph-keeping path: exact to any order."""
    init, xs, consts = _inputs(gen)
    got = _twice(jacrev(grad(_loss(policy))), init["h"], xs, consts)
    want = jacrev(grad(_loss(None)))(init["h"], xs, consts)
    assert_trees_close(got, want, **TOL)
    h = init["h"].clone().requires_grad_()
    (g,) = torch.autograd.grad(_loss(policy)(h, xs, consts), h, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), h)
    torch.testing.assert_close(gg, jacrev(grad(_loss(None)))(init["h"], xs, consts).sum(0), **TOL)


@policies
def test_forward_mode_stays_exact(policy, gen):
    """Forward mode and forward-over-reverse run their pieces eagerly: the same derivatives."""
    init, xs, consts = _inputs(gen)
    h, v = init["h"], rand(gen, 3)
    for transform in (
        lambda loss: jvp(lambda h0: loss(h0, xs, consts), (h,), (v,))[1],
        lambda loss: jacfwd(loss)(h, xs, consts),
        lambda loss: hessian(loss)(h, xs, consts),
        lambda loss: jvp(grad(lambda h0: loss(h0, xs, consts)), (h,), (v,))[1],
    ):
        got = _twice(transform, _loss(policy))
        assert_trees_close(got, transform(_loss(None)), **TOL)


def test_nested_vmap_peels_every_level(gen):
    h = rand(gen, 2, 3, 3, scale=0.5)
    _, xs, consts = _inputs(gen)

    def run(policy):
        inner = vmap(lambda h: _loss(policy)(h, xs, consts))
        return vmap(inner)(h)

    with compile_stats() as stats:
        got = _twice(run, "binomial")
    torch.testing.assert_close(got, run(None), **TOL)
    assert stats.calls > 0


# --------------------------------------------------------------------------------------------
# MAML


def _maml_problem(gen, n_tasks=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)
    x = rand(gen, n_tasks, 6, 1)
    xq = rand(gen, n_tasks, 6, 1)
    return model, fmaml.params(model), fmaml.Tasks((x, torch.sin(x)), (xq, torch.cos(xq)))


@pytest.fixture(scope="module")
def mamls():
    """A compiled and an eager MAML per policy, shared by the tests below (and their compiled
    pieces with them: a MAML object is part of its pieces' structure)."""
    model, params, tasks = _maml_problem(torch.Generator().manual_seed(7))
    out = {}
    for policy in ("store_all", "auto", "binomial"):
        compiled = fmaml.MAML(model, F.mse_loss, inner_lr=0.3, checkpoint=policy, compile=EAGER)
        out[policy] = (compiled, fmaml.MAML(model, F.mse_loss, inner_lr=0.3, checkpoint=policy))
    return params, tasks, out


def _maml_path(maml, path, params, tasks, k=3):
    if path == "meta_grad":
        return maml.meta_grad(params, tasks, k)[1]
    if path == "grad":
        return grad(maml.unrolled_loss)(params, tasks, k)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    maml.unrolled_loss(leaves, tasks, k).backward()
    return {n: p.grad for n, p in leaves.items()}


@pytest.mark.parametrize("policy", ["store_all", "auto", "binomial"])
@pytest.mark.parametrize("path", ["meta_grad", "grad", "backward"])
def test_maml_compiled_equals_eager(policy, path, mamls):
    params, tasks, by_policy = mamls
    compiled, eager = by_policy[policy]
    with compile_stats() as stats:
        got = _twice(_maml_path, compiled, path, params, tasks)
    assert_trees_close(got, _maml_path(eager, path, params, tasks), **TOL)
    assert stats.calls > 0 and not stats.failures


def test_maml_with_batch_norm_compiles(gen):
    """BatchNorm on batch statistics (plain ops under vmap, where the native kernel's second
    derivative is wrong) compiles, and equals eager."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).to(F64)
    params = fmaml.params(model)
    x = rand(gen, 4, 6, 1)
    tasks = fmaml.Tasks((x, torch.sin(x)), (x, torch.cos(x)))
    compiled = fmaml.MAML(model, F.mse_loss, inner_lr=0.3, batching="vmap", compile=EAGER)
    eager = fmaml.MAML(model, F.mse_loss, inner_lr=0.3, batching="vmap")
    with compile_stats() as stats:
        got = _twice(_maml_path, compiled, "grad", params, tasks, 2)
    assert_trees_close(got, _maml_path(eager, "grad", params, tasks, 2), **TOL)
    assert stats.calls > 0 and not stats.failures


def test_maml_keeping_graphs_compiles_the_chunk_whole(mamls):
    """Inner loops that keep their graphs compile with the task batching and the query loss:
    one compiled piece per chunk; a checkpointed inner loop compiles its steps instead."""
    params, tasks, by_policy = mamls
    whole, steps = by_policy["auto"][0], by_policy["binomial"][0]
    for maml in (whole, steps):
        _twice(maml.meta_grad, params, tasks, 3)
    with compile_stats() as stats, fmaml.record_scan() as record:
        whole.meta_grad(params, tasks, 3)
    assert stats.calls == 1 and stats.eager == 0
    assert record.scans == []  # traced inside the compiled chunk: no scan ran on its own
    with compile_stats() as stats, fmaml.record_scan() as record:
        steps.meta_grad(params, tasks, 3)
    assert stats.calls > 1  # the steps without a graph and the pull-backs
    assert [choice.keeps_graphs for choice in record.scans] == [False]


def test_compilations_are_bounded_over_many_meta_steps(mamls, gen):
    """One compilation per structure: new tasks of the same shapes every meta-step compile
    nothing new (dynamo's own graph counter, not time)."""
    params, _, by_policy = mamls
    params = {n: p.clone() for n, p in params.items()}

    def meta_step():
        _, _, tasks = _maml_problem(gen)
        for policy in ("store_all", "binomial"):
            maml = by_policy[policy][0]
            _, grads = maml.meta_grad(params, tasks, 3)
            grad(maml.unrolled_loss)(params, tasks, 3)
        for name, g in grads.items():
            params[name] -= 0.01 * g

    for _ in range(2):
        meta_step()
    graphs = counters["stats"]["unique_graphs"]
    with compile_stats() as stats:
        for _ in range(6):
            meta_step()
    assert counters["stats"]["unique_graphs"] == graphs
    assert stats.compiled == 0 and not stats.failures
    assert stats.calls >= 6 * 4  # every meta-step ran compiled pieces


# --------------------------------------------------------------------------------------------
# random numbers, fallbacks, auto, options


def _dropout_step(carry, x, consts):
    h = F.dropout(torch.tanh(carry @ consts + x), p=0.3, training=True)
    return h, h.sum()


def _dropout_grad(policy, compile, seed, h0, xs, a):
    torch.manual_seed(seed)
    return grad(
        lambda h, a: fmaml.scan(_dropout_step, h, xs, checkpoint=policy, consts=a, compile=compile)[
            1
        ].sum(),
        argnums=(0, 1),
    )(h0, a)


def test_dropout_replays_exactly(gen):
    h0, xs, a = rand(gen, 4), rand(gen, 6, 4), rand(gen, 4, 4, scale=0.5)
    _dropout_grad("binomial", EAGER, 0, h0, xs, a)
    got = _dropout_grad("binomial", EAGER, 1, h0, xs, a)
    want = _dropout_grad("store_all", False, 1, h0, xs, a)
    assert_trees_close(got, want, **TOL)


def _breaking_step(carry, x):
    torch._dynamo.graph_break()
    return carry * torch.cos(x), carry.sum()


def test_a_piece_that_fails_to_compile_runs_eagerly_after_one_warning(gen):
    h0, xs = rand(gen, 3).requires_grad_(), rand(gen, 4, 3)
    want_carry, want_ys = reference_scan(_breaking_step, h0, xs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            carry, ys = fmaml.scan(_breaking_step, h0, xs, checkpoint="binomial", compile=EAGER)
            torch.testing.assert_close(carry, want_carry, **TOL)
            torch.testing.assert_close(ys, want_ys, **TOL)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "torch.compile failed for the scan's step" in messages[0]
    assert "Why: Unsupported: Call to `torch._dynamo.graph_break()`" in messages[0]
    with compile_stats() as stats:
        fmaml.scan(_breaking_step, h0, xs, checkpoint="binomial", compile=EAGER)
    assert stats.calls == 0 and stats.eager > 0


def test_a_closure_over_a_differentiated_tensor_is_never_lost(gen):
    """A step that reads a tensor that requires grad without being given it: the compiled
    pieces refuse it (dynamo guards on requires_grad, so a change recompiles and is refused);
    a checkpointed scan then raises as it does eagerly, and store_all differentiates it."""
    h0, xs = rand(gen, 3), rand(gen, 4, 3)
    w = rand(gen, 3)

    def closing(carry, x):
        return torch.tanh(carry * w + x), carry.sum()

    for _ in range(2):  # compiled while w does not require grad
        fmaml.scan(closing, h0, xs, checkpoint="binomial", compile=EAGER)
    w.requires_grad_()
    with (
        pytest.warns(RuntimeWarning, match=r"reads a tensor that requires grad but is not one"),
        pytest.raises(ValueError, match=r"`f` closes over a tensor that is being differentiated"),
    ):
        fmaml.scan(closing, h0, xs, checkpoint="binomial", compile=EAGER)
    with pytest.warns(RuntimeWarning, match=r"reads a tensor that requires grad but is not one"):
        for _ in range(2):
            carry, ys = fmaml.scan(closing, h0, xs, checkpoint="store_all", compile=EAGER)
    (got,) = torch.autograd.grad((carry**2).sum() + ys.sum(), w)
    want_carry, want_ys = reference_scan(closing, h0, xs)
    (want,) = torch.autograd.grad((want_carry**2).sum() + want_ys.sum(), w)
    torch.testing.assert_close(got, want, **TOL)


def _small_step(carry, x):
    return torch.tanh(carry @ x), carry.sum()


def _large_step(carry, x):
    return torch.tanh(carry @ x) / 64, carry.sum()


def test_auto_compiles_small_operators_only(gen):
    auto = {"backend": "eager", "when": "auto"}
    small_c, small_xs = rand(gen, 4, 4), rand(gen, 3, 4, 4)
    large_c, large_xs = rand(gen, 256, 256), rand(gen, 3, 256, 256)
    with torch.no_grad():
        for _ in range(2):
            fmaml.scan(_small_step, small_c, small_xs, checkpoint="binomial", compile=auto)
            fmaml.scan(_large_step, large_c, large_xs, checkpoint="binomial", compile=auto)
        with compile_stats() as small:
            fmaml.scan(_small_step, small_c, small_xs, checkpoint="binomial", compile=auto)
        with compile_stats() as large:
            fmaml.scan(_large_step, large_c, large_xs, checkpoint="binomial", compile=auto)
    assert small.calls > 0 and small.eager == 0  # 64 FLOPs per operator: compiled
    assert large.calls == 0 and large.eager > 0  # 2**25 FLOPs per matmul: eager


def test_auto_leaves_a_large_store_all_scan_as_the_plain_loop(gen):
    """Where "auto" declines, a store_all scan runs its plain loop (not the one-step checkpointed
    scan that compiling it would use, which recomputes the loop in the backward pass)."""
    auto = {"backend": "eager", "when": "auto"}
    c, xs = rand(gen, 256, 256).requires_grad_(), rand(gen, 3, 256, 256)
    want = torch.autograd.grad(reference_scan(_large_step, c, xs)[1].sum(), c)
    for _ in range(3):
        with compile_stats() as stats, fmaml.record_scan() as record:
            _, ys = fmaml.scan(_large_step, c, xs, checkpoint="store_all", compile=auto)
        torch.testing.assert_close(torch.autograd.grad(ys.sum(), c), want, **TOL)
        assert stats.calls == 0
        assert [choice.keeps_graphs for choice in record.scans] == [True]  # no WholeLoop


def _dynamic_step(carry, x):
    return torch.tanh(carry + x.sum()), carry.mean()


def _dynamic_grad(h0, xs, policy, compile):
    def loss(h):
        if policy is None:
            return reference_scan(_dynamic_step, h, xs)[1].sum()
        return fmaml.scan(_dynamic_step, h, xs, checkpoint=policy, compile=compile)[1].sum()

    return grad(loss)(h0)


def test_dynamic_shapes_share_one_structure(gen):
    """``dynamic=True``: shapes leave the key, so new sizes compile nothing new."""
    dynamic = {"backend": "eager", "dynamic": True}
    entries = []
    for n in (3, 5, 7):
        h0, xs = rand(gen, n), rand(gen, 4, n)
        with compile_stats() as stats:
            _twice(_dynamic_grad, h0, xs, "binomial", dynamic)
        got = _dynamic_grad(h0, xs, "binomial", dynamic)
        torch.testing.assert_close(got, _dynamic_grad(h0, xs, None, None), **TOL)
        entries.append(stats.compiled)
    assert entries[0] > 0 and entries[1:] == [0, 0]


def test_store_all_scan_traces_inside_torch_compile(gen):
    init, xs, consts = _inputs(gen)
    compiled = torch.compile(
        grad(_loss("store_all", compile=False)), backend="eager", fullgraph=True
    )
    torch.testing.assert_close(
        compiled(init["h"], xs, consts), grad(_loss(None))(init["h"], xs, consts), **TOL
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (False, None),
        (True, fmaml.Compile()),
        ("auto", fmaml.Compile(when="auto")),
        ({"mode": "max-autotune-no-cudagraphs"}, fmaml.Compile(mode="max-autotune-no-cudagraphs")),
        (fmaml.Compile(backend="aot_eager"), fmaml.Compile(backend="aot_eager")),
    ],
)
def test_compile_shorthands(value, expected):
    assert resolve_compile(value, "fmaml.scan") == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("fast", r"fmaml.scan: `compile` must be True, False, 'auto', a dict .* got 'fast'"),
        ({"modes": "x"}, r"fmaml.scan: unknown `compile` option\(s\) \['modes'\]"),
        ({"when": "sometimes"}, r"Compile: `when` must be one of \('always', 'auto'\)"),
        ({"mode": "fastest"}, r"Compile: `mode` must be None or one of .*'reduce-overhead'"),
        ({"backend": "eager", "mode": "reduce-overhead"}, r"`mode` and `options` are inductor's"),
        ({"auto_flops_per_op": -1}, r"`auto_flops_per_op` must be a number >= 0 or None"),
        ({"dynamic": "yes"}, r"`dynamic` must be True, False or None"),
    ],
)
def test_bad_compile_options_name_the_argument(value, match, gen):
    with pytest.raises((ValueError, TypeError), match=match):
        fmaml.scan(_small_step, rand(gen, 2, 2), rand(gen, 3, 2, 2), compile=value)


def test_maml_rejects_bad_compile(gen):
    model, _, _ = _maml_problem(gen)
    with pytest.raises(ValueError, match=r"MAML: `compile` must be True, False, 'auto'"):
        fmaml.MAML(model, F.mse_loss, compile="yes")


# --------------------------------------------------------------------------------------------
# inductor (slow: compiling C++ takes tens of seconds here)


@pytest.fixture(scope="module")
def inductor_maml():
    """A tiny conv net with dropout (a convolution's second derivative is where inductor once
    went wrong: fmaml.optim.update_and_apply)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8, 3),
    ).to(F64)
    params = fmaml.params(model)
    g = torch.Generator().manual_seed(5)
    x, xq = rand(g, 2, 3, 1, 4, 4), rand(g, 2, 3, 1, 4, 4)
    labels = torch.arange(3).repeat(2, 1)
    return model, params, fmaml.Tasks((x, labels), (xq, labels))


@pytest.mark.slow
def test_inductor_float64_equals_eager_with_dropout(inductor_maml):
    """Inductor's kernels in float64, and dropout replayed by a checkpointed scan across its
    compiled pieces (the step without a graph in the forward pass, the step with its vjp in the
    backward: two graphs that must draw the same numbers, as eager dropout does), and a chunk
    compiled whole (store_all), under ``.backward()``, one task at a time."""
    model, params, tasks = inductor_maml
    for policy in ("binomial", "store_all"):
        compiled = fmaml.MAML(
            model, F.cross_entropy, inner_lr=0.3, checkpoint=policy, batching="loop", compile=True
        )
        eager = fmaml.MAML(
            model, F.cross_entropy, inner_lr=0.3, checkpoint="store_all", batching="loop"
        )

        def run(maml, seed):
            torch.manual_seed(seed)
            return _maml_path(maml, "backward", params, tasks, k=2)

        with compile_stats() as stats:
            run(compiled, 0)
            got = run(compiled, 1)
        assert stats.calls > 0 and not stats.failures
        assert_trees_close(got, run(eager, 1), rtol=1e-10, atol=1e-12)
        assert optree.tree_all(optree.tree_map(lambda t: bool(t.abs().sum() > 0), got))
