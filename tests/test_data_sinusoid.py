"""``fmaml.data``: the public surface, and the sinusoid regression tasks (Finn et al., 2017)."""

from __future__ import annotations

import importlib
import inspect
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fmaml
import fmaml.data
from fmaml.data import SinusoidMeta, SinusoidTasks, true_function


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the subpackage's public surface ------------------------------------------------------------


def test_data_all_is_sorted_unique_importable_and_documented():
    names = fmaml.data.__all__
    assert list(names) == sorted(names) and len(set(names)) == len(names)
    module = importlib.import_module("fmaml.data")
    for name in names:
        obj = getattr(module, name)
        if callable(obj):
            assert (inspect.getdoc(obj) or "").strip(), f"fmaml.data.{name} has no docstring"


# --- sampling ------------------------------------------------------------------------------------


def test_shapes_types_and_meta():
    tasks, meta = SinusoidTasks().sample(7, 5, 3, gen())
    assert isinstance(tasks, fmaml.Tasks) and isinstance(meta, SinusoidMeta)
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    assert xs.shape == ys.shape == (7, 5, 1)
    assert xq.shape == yq.shape == (7, 3, 1)
    assert meta.amplitude.shape == meta.phase.shape == (7,)
    assert all(t.dtype == torch.float32 for t in (xs, ys, xq, yq, *meta))


@given(n_tasks=st.integers(1, 6), k_support=st.integers(1, 6), k_query=st.integers(1, 6))
def test_shapes_for_any_counts(n_tasks, k_support, k_query):
    tasks, meta = SinusoidTasks().sample(n_tasks, k_support, k_query, gen(), dtype=torch.float64)
    assert tasks.support[0].shape == (n_tasks, k_support, 1)
    assert tasks.query[1].shape == (n_tasks, k_query, 1)
    assert tasks.support[0].dtype == torch.float64 and meta.phase.shape == (n_tasks,)


def test_default_ranges_are_finn_et_al_and_respected():
    dist = SinusoidTasks()
    assert dist.amplitude == (0.1, 5.0) and dist.phase == (0.0, math.pi)
    assert dist.x_range == (-5.0, 5.0)
    tasks, meta = dist.sample(2000, 10, 10, gen(), dtype=torch.float64)
    x = torch.cat([tasks.support[0], tasks.query[0]], dim=1)
    assert meta.amplitude.min() >= 0.1 and meta.amplitude.max() <= 5.0
    assert meta.phase.min() >= 0.0 and meta.phase.max() <= math.pi
    assert x.min() >= -5.0 and x.max() <= 5.0
    # and they are spread over the range, not stuck in a corner
    assert meta.amplitude.min() < 0.2 and meta.amplitude.max() > 4.9
    assert x.min() < -4.99 and x.max() > 4.99


def test_custom_ranges_are_respected_and_a_point_range_is_constant():
    dist = SinusoidTasks(amplitude=(2.0, 2.0), phase=(1.0, 1.5), x_range=(0.0, 0.5))
    tasks, meta = dist.sample(100, 4, 4, gen(), dtype=torch.float64)
    assert torch.equal(meta.amplitude, torch.full((100,), 2.0, dtype=torch.float64))
    assert meta.phase.min() >= 1.0 and meta.phase.max() <= 1.5
    assert tasks.support[0].min() >= 0.0 and tasks.query[0].max() <= 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_y_is_a_sin_x_minus_phase_exactly(dtype):
    tasks, meta = SinusoidTasks().sample(16, 5, 7, gen(3), dtype=dtype)
    a, p = meta.amplitude[:, None, None], meta.phase[:, None, None]
    for x, y in (tasks.support, tasks.query):  # support and query share each task's A and φ
        assert torch.equal(y, a * torch.sin(x - p))
        assert torch.equal(y, true_function(meta.amplitude, meta.phase, x))


def test_true_function_broadcasts_numbers_and_per_task_tensors():
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)
    assert torch.equal(true_function(2.0, 0.5, x), 2.0 * torch.sin(x - 0.5))
    amplitude, phase = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    xt = torch.stack([x.float(), x.float()])[..., None]  # (T=2, 11, 1)
    y = true_function(amplitude, phase, xt)
    assert y.shape == (2, 11, 1)
    assert torch.equal(y[1], 3.0 * torch.sin(xt[1] - 1.0))


def test_deterministic_given_the_generator():
    dist = SinusoidTasks()
    (t1, m1), (t2, m2) = dist.sample(8, 5, 5, gen(7)), dist.sample(8, 5, 5, gen(7))
    for a, b in zip((*t1.support, *t1.query, *m1), (*t2.support, *t2.query, *m2), strict=True):
        assert torch.equal(a, b)
    t3, _ = dist.sample(8, 5, 5, gen(8))
    assert not torch.equal(t1.support[0], t3.support[0])
    # a generator advances: two draws in a row differ
    g = gen(7)
    first, _ = dist.sample(8, 5, 5, g)
    second, _ = dist.sample(8, 5, 5, g)
    assert torch.equal(first.support[0], t1.support[0])
    assert not torch.equal(first.support[0], second.support[0])


def test_same_tasks_in_every_dtype_up_to_rounding():
    t32, m32 = SinusoidTasks().sample(8, 5, 5, gen(1), dtype=torch.float32)
    t64, m64 = SinusoidTasks().sample(8, 5, 5, gen(1), dtype=torch.float64)
    assert torch.equal(m32.phase, m64.phase.float())
    assert torch.equal(t32.query[0], t64.query[0].float())
    torch.testing.assert_close(t32.query[1], t64.query[1].float())


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"amplitude": (5.0, 0.1)}, r"`amplitude` must be ordered .* swap the bounds"),
        ({"phase": (1.0, 0.0)}, r"`phase` must be ordered \(low, high\)"),
        ({"x_range": (5.0, -5.0)}, r"`x_range` must be ordered"),
        ({"x_range": (0.0, math.inf)}, r"`x_range` must be a pair of finite numbers"),
        ({"amplitude": (1.0, 2.0, 3.0)}, r"`amplitude` must be a pair .* got \(1.0, 2.0, 3.0\)"),
        ({"phase": 1.0}, r"`phase` must be a pair of finite numbers"),
    ],
)
def test_bad_ranges_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinusoidTasks(**kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 5, 5), r"`n_tasks` must be an int >= 1, got 0"),
        ((4, 0, 5), r"`k_support` must be an int >= 1, got 0"),
        ((4, 5, -1), r"`k_query` must be an int >= 1, got -1"),
        ((4, 2.0, 5), r"`k_support` must be an int >= 1, got 2.0"),
        ((True, 5, 5), r"`n_tasks` must be an int >= 1, got True"),
    ],
)
def test_bad_counts_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        SinusoidTasks().sample(*args, gen())


def test_bad_generator_and_dtype():
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator, got int"):
        SinusoidTasks().sample(2, 2, 2, 0)
    with pytest.raises(TypeError, match=r"`dtype` must be a floating torch.dtype"):
        SinusoidTasks().sample(2, 2, 2, gen(), dtype=torch.int64)
