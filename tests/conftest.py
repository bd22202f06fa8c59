"""Shared test setup for the ``fmaml.scan`` tests: hypothesis profile, policies, reference loop.

Numerical tests build their tensors in float64 explicitly (the global default dtype is left alone)
and compare against :func:`reference_scan`, the seven-line loop that defines ``fmaml.scan``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
from hypothesis import HealthCheck, settings

import fmaml

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=30,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=200, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

F64 = torch.float64


# One intra-op thread for the whole suite: the tensors are tiny, and a second thread's spin-waits
# cost far more than they save on a 2-core machine shared with other work.
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    # torch's first forward-mode call scripts its jvp decompositions with the deprecated
    # torch.jit.script: not ours, and not something a test can fix.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
    )


#: Every implementation that ``fmaml.scan`` can run; one test body runs over all of them.
POLICIES: list[Any] = [
    fmaml.StoreAll(),
    "sqrt",
    fmaml.Uniform(1),
    fmaml.Uniform(3),
    "binomial",
    fmaml.Binomial(1),
    fmaml.Binomial(2),
    fmaml.Binomial(5),
    fmaml.Auto(max_snapshots=2),
    fmaml.Auto(budget_bytes=1),
    "auto",
]

#: The policies that checkpoint (all but store_all, and the default "auto", which keeps the small
#: graphs of the tests).
CHECKPOINTED: list[Any] = POLICIES[1:-1]


def policy_id(policy: Any) -> str:
    """A short pytest id: ``sqrt``, ``Uniform(3)``, ``Auto(budget_bytes=1)``."""
    if isinstance(policy, str):
        return policy
    fields = {k: v for k, v in vars(policy).items() if v is not None}
    if isinstance(policy, fmaml.Auto):
        return "Auto(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"
    return f"{type(policy).__name__}({', '.join(str(v) for v in fields.values())})"


all_policies = pytest.mark.parametrize("policy", POLICIES, ids=policy_id)
checkpointed_policies = pytest.mark.parametrize("policy", CHECKPOINTED, ids=policy_id)


def reference_scan(
    f: Callable[..., Any], init: Any, xs: Any = None, length: int | None = None, consts: Any = None
) -> tuple[Any, Any]:
    """The naive Python loop that defines ``fmaml.scan`` (its docstring, with ``consts``)."""
    if length is None:
        length = optree.tree_leaves(xs)[0].shape[0]
    carry, ys = init, []
    for i in range(length):
        x = None if xs is None else optree.tree_map(lambda leaf, i=i: leaf[i], xs)
        carry, y = f(carry, x) if consts is None else f(carry, x, consts)
        ys.append(y)
    if not ys:
        return carry, None
    return carry, optree.tree_map(lambda *leaves: torch.stack(leaves), *ys)


def rand(generator: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """A float64 normal tensor from ``generator`` (never the global RNG)."""
    return torch.randn(shape, generator=generator, dtype=F64) * scale


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def assert_trees_close(
    actual: Any, expected: Any, rtol: float = 1e-12, atol: float = 1e-12
) -> None:
    """Same structure, and every leaf ``torch.testing.assert_close`` (dtypes included)."""
    a_leaves, a_spec = optree.tree_flatten(actual)
    e_leaves, e_spec = optree.tree_flatten(expected)
    assert a_spec == e_spec, f"structure {a_spec} != {e_spec}"
    for a, e in zip(a_leaves, e_leaves, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)
