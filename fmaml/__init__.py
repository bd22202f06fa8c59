"""fmaml: memory-efficient, exact MAML on ``torch.func``.

The heart is :func:`scan`, ``jax.lax.scan`` with checkpointed gradients (optimal binomial
schedules), which composes with ``torch.func.grad``, ``vmap``, ``jacrev`` and plain autograd.
"""

from fmaml import data, optim
from fmaml._batching import TaskFootprint
from fmaml._compile import Compile
from fmaml._functional import load_params, params
from fmaml._imaml import IMAMLInfo, imaml_adapt, imaml_grad
from fmaml._maml import MAML, reptile_direction
from fmaml._policy import Auto, Binomial, Policy, StoreAll, Uniform
from fmaml._scan import ScanChoice, ScanStats, record_scan, scan
from fmaml._schedule import Plan, binomial_cost, binomial_plan, uniform_plan
from fmaml._typing import MetaAux, Tasks

__all__ = [
    "Auto",
    "Binomial",
    "Compile",
    "IMAMLInfo",
    "MAML",
    "MetaAux",
    "Plan",
    "Policy",
    "ScanChoice",
    "ScanStats",
    "StoreAll",
    "TaskFootprint",
    "Tasks",
    "Uniform",
    "binomial_cost",
    "binomial_plan",
    "data",
    "imaml_adapt",
    "imaml_grad",
    "load_params",
    "optim",
    "params",
    "record_scan",
    "reptile_direction",
    "scan",
    "uniform_plan",
]

__version__ = "0.1.0.dev0"
