"""Smoke test of the benchmark suite's building blocks (not a timing test).

Builds each workload of ``benchmarks/_workloads.py`` at toy size (k=2, 16x16 images, 4 filters,
float64) and checks, in this process, that every library wrapper of ``benchmarks/_peers.py``
computes the same meta-gradient as fmaml ``store_all``, as the suite's agreement check does.
Peers that do not import are skipped. Also checks the suite's extrapolation helper.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

# ``benchmarks`` is a folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import suite
from benchmarks._peers import available, make, relative_error
from benchmarks._workloads import WORKLOADS, build, conv4

TOY = {"filters": 4, "image": 16, "support": 5, "query": 6}
CASES = [
    ("fmaml", {"policy": "auto"}),
    ("fmaml", {"policy": "binomial", "batching": "loop"}),
    ("fmaml", {"policy": "sqrt", "batching": "vmap", "task_chunk": 2}),
    ("torch.func", {"batching": "vmap"}),
    ("torch.func", {"batching": "loop"}),
    ("higher", {}),
    ("torch_maml", {}),
    ("torch_maml", {"checkpoint_steps": 1}),
    ("torchopt", {}),
    ("learn2learn", {}),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy(name: str):
    tasks = 3 if WORKLOADS[name].tasks > 1 else 1
    return build(name, 2, dtype=torch.float64, tasks=tasks, **TOY)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_shapes(name):
    wl = _toy(name)
    (xs, ys), (xq, yq) = wl.tasks
    spec = wl.spec
    assert xs.shape == (spec.tasks, spec.support, 1, 16, 16) and ys.shape == (spec.tasks, 5)
    assert xq.shape[:2] == (spec.tasks, 6) and int(yq.max()) < spec.ways
    assert wl.model(xs[0]).shape == (5, spec.ways)


def test_full_size_conv4_head():
    """Four poolings take 28x28 to 1x1: the head is Linear(filters, 5), as the suite states."""
    model = conv4(64)
    assert model[-1].in_features == 64
    assert sum(p.numel() for p in model.parameters()) == 111_749


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_meta_gradients_agree(name):
    wl = _toy(name)
    ref_loss, ref = make("fmaml", wl, policy="store_all")()
    assert all(torch.isfinite(g).all() for g in ref.values())
    assert sum(float(g.abs().sum()) for g in ref.values()) > 0
    checked = 0
    for library, options in CASES:
        if not available(library):
            continue
        loss, grads = make(library, wl, **options)()
        assert list(grads) == list(ref), library
        err = relative_error(grads, ref)
        assert err < 1e-10, f"{library} {options}: relative error {err:.1e}"
        assert abs(float(loss) - float(ref_loss)) < 1e-10, library
        checked += 1
    assert checked >= 5  # fmaml x3 and torch.func x2 always import


def test_peers_differ_when_the_computation_differs():
    """The agreement check can fail: a different inner learning rate gives a different gradient."""
    wl = _toy("A")
    _, ref = make("fmaml", wl, policy="store_all")()
    wl.lr *= 2
    _, other = make("fmaml", wl, policy="store_all")()
    assert relative_error(other, ref) > 1e-3


def test_largest_k_within():
    mib = 2**20
    linear = [(10, 10 * mib), (100, 100 * mib)]
    k, how = suite.largest_k_within(linear, 1000 * mib)
    assert math.isclose(k, 1000) and how.startswith("extrapolated")
    k, how = suite.largest_k_within(
        [(10, 10 * mib), (100, 100 * mib), (1000, 1000 * mib)], 550 * mib
    )
    assert math.isclose(k, 550) and how == "interpolated"
    k, _ = suite.largest_k_within([(1000, 80 * mib), (10000, 80.5 * mib)], 1024 * mib)
    assert math.isinf(k)


def test_grid_cuts_for_a_short_lease():
    """``--ks`` and ``--labels`` (labels hold commas, so ';' separates them) cut the grid."""
    args = suite.parse_args(["--ks", "100,400", "--labels", "higher;torch_maml, ckpt every step"])
    assert args.ks == [100, 400]
    assert args.labels == ["higher", "torch_maml, ckpt every step"]
    known = {e.label for e in suite.entries_a()}
    assert set(args.labels) <= known


def test_loop_overhead_routes_compute_the_same_meta_gradient():
    """benchmarks/loop_overhead.py times four calls: they must be the same computation."""
    from benchmarks.loop_overhead import routes

    fns, model = routes(k=2, tasks_n=3)
    grads = {}
    for name in ("hand-written", "backward"):
        fns[name]()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["grad"] = fns["grad"]()
    grads["meta_grad"] = fns["meta_grad"]()[1]
    for name, got in grads.items():
        for key, want in grads["hand-written"].items():
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-7, msg=name)
