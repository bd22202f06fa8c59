"""Bad inputs to ``fmaml.scan`` raise clear errors before any work; unsupported derivatives raise.

Each argument error is raised before ``f`` runs (a counting ``f`` proves it); carry errors are
found after the first step, so ``f`` ran exactly once.
"""

from __future__ import annotations

import pytest
import torch
from conftest import F64, POLICIES, checkpointed_policies, policy_id, rand, reference_scan
from torch.func import grad, jacfwd, jacrev, jvp, vjp

import fmaml


class _Counting:
    """A step that counts its calls; ``out`` overrides what it returns."""

    def __init__(self, out=None) -> None:
        self.calls = 0
        self.out = out

    def __call__(self, c, x, *consts):
        self.calls += 1
        if self.out is not None:
            return self.out(c, x)
        return c, None


all_policies = pytest.mark.parametrize("policy", POLICIES, ids=policy_id)


# --------------------------------------------------------------------------------------------
# arguments, checked before any step runs


@all_policies
def test_length_required_without_xs(policy):
    f = _Counting()
    with pytest.raises(ValueError, match=r"`length` is required when `xs` is None"):
        fmaml.scan(f, torch.zeros(2), checkpoint=policy)
    with pytest.raises(ValueError, match=r"`length` is required"):
        fmaml.scan(f, torch.zeros(2), {}, checkpoint=policy)  # xs with no leaves
    assert f.calls == 0


@all_policies
def test_length_disagrees_with_xs(policy):
    f = _Counting()
    with pytest.raises(ValueError, match=r"`length`=3 disagrees with the leading size 4"):
        fmaml.scan(f, torch.zeros(2), torch.zeros(4, 2), length=3, checkpoint=policy)
    assert f.calls == 0


@all_policies
def test_xs_leading_sizes_differ(policy):
    f = _Counting()
    xs = {"a": torch.zeros(4, 2), "b": torch.zeros(5)}
    with pytest.raises(
        ValueError, match=r"must share their leading size, got xs\['a'\]: 4, xs\['b'\]: 5"
    ):
        fmaml.scan(f, torch.zeros(2), xs, checkpoint=policy)
    assert f.calls == 0


@all_policies
def test_zero_dim_xs_leaf(policy):
    f = _Counting()
    with pytest.raises(ValueError, match=r"xs\[1\] is a 0-d tensor"):
        fmaml.scan(f, torch.zeros(2), (torch.zeros(3), torch.tensor(1.0)), checkpoint=policy)
    assert f.calls == 0


@all_policies
@pytest.mark.parametrize(
    ("where", "path"),
    [("init", r"init\['a'\]"), ("xs", r"xs\[0\]\['b'\]"), ("consts", r"consts\['lr'\]")],
)
def test_non_tensor_leaf(policy, where, path):
    f = _Counting()
    args = {
        "init": {"a": torch.zeros(2), "c": torch.zeros(1)},
        "xs": ({"b": torch.zeros(3, 2)},),
        "consts": {"lr": torch.tensor(0.1)},
    }
    bad = {
        "init": {"a": 0.5, "c": torch.zeros(1)},
        "xs": ({"b": [1.0, 2.0, 3.0]},),
        "consts": {"lr": 0.1},
    }
    args[where] = bad[where]
    with pytest.raises(TypeError, match=rf"every leaf of `{where}` must be a tensor, but {path}"):
        fmaml.scan(f, args["init"], args["xs"], checkpoint=policy, consts=args["consts"])
    assert f.calls == 0


def test_unknown_policy_string():
    f = _Counting()
    with pytest.raises(ValueError, match=r"unknown `checkpoint` 'revolve'.*'store_all'"):
        fmaml.scan(f, torch.zeros(2), length=3, checkpoint="revolve")
    with pytest.raises(ValueError, match=r"unknown `checkpoint` 3"):
        fmaml.scan(f, torch.zeros(2), length=3, checkpoint=3)
    assert f.calls == 0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: fmaml.Binomial(0), r"Binomial: `snapshots` must be an int >= 1 or None, got 0"),
        (lambda: fmaml.Binomial(-2), r"Binomial: `snapshots` must be an int >= 1"),
        (lambda: fmaml.Binomial(2.0), r"Binomial: `snapshots` must be an int >= 1"),
        (lambda: fmaml.Binomial(True), r"Binomial: `snapshots` must be an int >= 1"),
        (lambda: fmaml.Uniform(0), r"Uniform: `every` must be an int >= 1 or None, got 0"),
        (lambda: fmaml.Auto(max_snapshots=0), r"Auto: `max_snapshots` must be an int >= 1"),
        (lambda: fmaml.Auto(budget_bytes=0), r"Auto: `budget_bytes` must be a number of bytes"),
        (lambda: fmaml.Auto(budget_bytes=-5), r"`budget_bytes` must be .* got -5"),
        (lambda: fmaml.Auto(budget_bytes=float("nan")), r"`budget_bytes` must be .* got nan"),
        (lambda: fmaml.Auto(budget_bytes=float("inf")), r"`budget_bytes` .* got inf"),
        (lambda: fmaml.Auto(budget_bytes="1GB"), r"`budget_bytes` .* got '1GB'"),
        (lambda: fmaml.Auto(budget_bytes=True), r"`budget_bytes` .* got True"),
    ],
)
def test_bad_policy_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@all_policies
def test_negative_or_non_int_length(policy):
    f = _Counting()
    with pytest.raises(ValueError, match=r"`length` must be >= 0, got -1"):
        fmaml.scan(f, torch.zeros(2), length=-1, checkpoint=policy)
    with pytest.raises(TypeError, match=r"`length` must be an int or None, got 2.0"):
        fmaml.scan(f, torch.zeros(2), length=2.0, checkpoint=policy)
    assert f.calls == 0


def test_f_not_callable():
    with pytest.raises(TypeError, match=r"`f` must be callable, got int"):
        fmaml.scan(3, torch.zeros(2), length=2)


# --------------------------------------------------------------------------------------------
# the carry, checked after the first step


@all_policies
def test_carry_structure_changes(policy):
    f = _Counting(lambda c, x: ({"a": c["a"], "extra": c["a"]}, None))
    with pytest.raises(TypeError, match=r"returned a carry with structure .* at step 0"):
        fmaml.scan(f, {"a": torch.zeros(2)}, length=3, checkpoint=policy)
    assert f.calls == 1


@all_policies
def test_carry_shape_changes(policy):
    f = _Counting(lambda c, x: ({"a": c["a"], "b": torch.zeros(3)}, None))
    init = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(TypeError, match=r"carry component carry\['b'\] has type float32\[2\]"):
        fmaml.scan(f, init, length=3, checkpoint=policy)
    assert f.calls == 1


@all_policies
def test_carry_dtype_changes(policy):
    f = _Counting(lambda c, x: ((c[0], c[1].to(F64)), None))
    with pytest.raises(
        TypeError, match=r"carry\[1\] has type float32\[2\] .* returned float64\[2\]"
    ):
        fmaml.scan(f, (torch.zeros(1), torch.zeros(2)), length=3, checkpoint=policy)
    assert f.calls == 1


@all_policies
def test_carry_non_tensor_leaf(policy):
    f = _Counting(lambda c, x: ({"a": 1.0}, None))
    with pytest.raises(TypeError, match=r"non-tensor carry leaf carry\['a'\]"):
        fmaml.scan(f, {"a": torch.zeros(2)}, length=3, checkpoint=policy)
    assert f.calls == 1


@all_policies
@pytest.mark.parametrize("out", [lambda c, x: c, lambda c, x: (c, None, None), lambda c, x: [c, 1]])
def test_f_must_return_a_pair(policy, out):
    f = _Counting(out)
    with pytest.raises(TypeError, match=r"`f` must return a pair \(carry, y\)"):
        fmaml.scan(f, torch.zeros(2), length=3, checkpoint=policy)
    assert f.calls == 1


@all_policies
def test_y_must_be_tensors(policy):
    f = _Counting(lambda c, x: (c, {"y": "text"}))
    with pytest.raises(TypeError, match=r"every leaf of `y` must be a tensor"):
        fmaml.scan(f, torch.zeros(2), length=3, checkpoint=policy)
    assert f.calls == 1


@all_policies
@pytest.mark.parametrize("change", ["more_leaves", "other_keys"])
def test_y_structure_changes_between_steps(policy, change):
    def out(c, x):
        if int(x) < 2:
            return c + 1, {"a": c.sum()}
        return c + 1, {"a": c.sum(), "b": c} if change == "more_leaves" else {"b": c.sum()}

    f = _Counting(out)
    with pytest.raises(TypeError, match=r"returned y with structure .* at step 2, but"):
        fmaml.scan(f, torch.zeros(2), torch.arange(4), checkpoint=policy)
    assert f.calls == 3


# --------------------------------------------------------------------------------------------
# closed-over tensors that are being differentiated


def _closing_over(w):
    def f(c, x):
        return torch.tanh(c * w + x), None

    return f


@checkpointed_policies
def test_closure_requires_grad_under_plain_autograd(policy):
    w = torch.tensor([0.5, 1.5], dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=r"`f` closes over a tensor that is being differentiated"):
        fmaml.scan(
            _closing_over(w),
            torch.ones(2, dtype=F64),
            torch.ones(3, 2, dtype=F64),
            checkpoint=policy,
        )
    # a closure that nobody differentiates is fine
    carry, _ = fmaml.scan(
        _closing_over(w.detach()),
        torch.ones(2, dtype=F64),
        torch.ones(3, 2, dtype=F64),
        checkpoint=policy,
    )
    assert not carry.requires_grad


@checkpointed_policies
def test_closure_is_the_differentiated_argument_of_func_grad(policy):
    init, xs = torch.ones(2, dtype=F64), torch.ones(3, 2, dtype=F64)

    def loss(w):
        return fmaml.scan(_closing_over(w), init, xs, checkpoint=policy)[0].sum()

    with pytest.raises(ValueError, match=r"closes over a tensor.*Pass it explicitly, as `consts=`"):
        grad(loss)(torch.tensor([0.5, 1.5], dtype=F64))


@checkpointed_policies
def test_closure_tracked_only_by_the_outer_level_of_jacrev_grad(policy):
    init, xs = torch.ones(2, dtype=F64), torch.ones(3, 2, dtype=F64)

    def inner(v, w):
        return fmaml.scan(_closing_over(w), v, xs, checkpoint=policy)[0].sum()

    def outer(w):
        return grad(inner)(init, w)  # the inner grad differentiates `v`, not `w`

    with pytest.raises(ValueError, match=r"closes over a tensor that is being differentiated"):
        jacrev(outer)(torch.tensor([0.5, 1.5], dtype=F64))


def test_closure_works_with_store_all():
    # store_all is a plain loop: closures are differentiated like any Python code
    init, xs = torch.ones(2, dtype=F64), torch.ones(3, 2, dtype=F64)
    w = torch.tensor([0.5, 1.5], dtype=F64)

    def inner(v, w):
        return fmaml.scan(_closing_over(w), v, xs, checkpoint="store_all")[0].sum()

    def ref(v, w):
        return reference_scan(_closing_over(w), v, xs)[0].sum()

    torch.testing.assert_close(
        jacrev(lambda w: grad(inner)(init, w))(w), jacrev(lambda w: grad(ref)(init, w))(w)
    )


# --------------------------------------------------------------------------------------------
# derivatives that are not supported raise instead of being wrong


def _step(c, x):
    return torch.sin(c) * 1.1 + x, (c**2).sum()


@checkpointed_policies
@pytest.mark.parametrize("loss", ["linear", "nonlinear"])
def test_create_graph_inside_func_grad_raises(policy, loss):
    xs = rand(torch.Generator().manual_seed(3), 5, 3)

    def outer(w):
        carry, _ = fmaml.scan(_step, w, xs, checkpoint=policy)
        out = carry.sum() if loss == "linear" else (carry**2).sum()
        (g,) = torch.autograd.grad(out, w, create_graph=True)
        return (g**2).sum()

    with pytest.raises(RuntimeError, match=r"fmaml.scan: a gradient computed .* without a graph"):
        grad(outer)(torch.linspace(-1, 1, 3, dtype=F64))


def test_create_graph_inside_func_grad_works_with_store_all():
    xs = rand(torch.Generator().manual_seed(3), 5, 3)

    def outer(scan):
        def fn(w):
            carry, _ = scan(w)
            (g,) = torch.autograd.grad(carry.sum(), w, create_graph=True)
            return (g**2).sum()

        return fn

    w = torch.linspace(-1, 1, 3, dtype=F64)
    got = grad(outer(lambda w: fmaml.scan(_step, w, xs, checkpoint="store_all")))(w)
    want = grad(outer(lambda w: reference_scan(_step, w, xs)))(w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.abs().max() > 1e-3


@pytest.mark.parametrize("policy", POLICIES, ids=policy_id)
def test_forward_mode_against_jacrev_and_finite_differences(policy):
    """Forward mode works under every policy (``fmaml._forward``; ``test_scan_forward.py``);
    what it leaves unsupported raises there."""
    gen = torch.Generator().manual_seed(3)
    xs = rand(gen, 5, 3)
    w, tangent = rand(gen, 3), rand(gen, 3)

    def fn(w):
        return fmaml.scan(_step, w, xs, checkpoint=policy)

    (carry, ys), (t_carry, t_ys) = jvp(fn, (w,), (tangent,))
    torch.testing.assert_close((carry, ys), reference_scan(_step, w, xs), rtol=0, atol=0)
    # against the Jacobian built in reverse mode: J @ tangent
    jac_carry, jac_ys = jacrev(fn)(w)
    torch.testing.assert_close(t_carry, jac_carry @ tangent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t_ys, jac_ys @ tangent, rtol=1e-12, atol=1e-12)
    # and against central finite differences
    eps = 1e-6
    fd = (fn(w + eps * tangent)[0] - fn(w - eps * tangent)[0]) / (2 * eps)
    torch.testing.assert_close(t_carry, fd, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(jacfwd(lambda w: fn(w)[0])(w), jac_carry, rtol=1e-12, atol=1e-12)
    # vjp agrees with the transpose of the same Jacobian
    _, pullback = vjp(fn, w)
    ct = (rand(gen, 3), rand(gen, 5))
    torch.testing.assert_close(pullback(ct)[0], ct[0] @ jac_carry + ct[1] @ jac_ys)
