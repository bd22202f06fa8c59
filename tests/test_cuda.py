"""On a CUDA device: the same meta-gradients as the naive CPU reference, random numbers replayed in
recomputation, the CLI and torchrun with NCCL.

Skipped where no GPU is visible (CI has none). Run them on a GPU machine with
``python -m pytest tests/test_cuda.py``. All 26 passed on an NVIDIA H200 with torch 2.11.0+cu130
on 2026-11-26 (the torchrun test after the fix of ``distributed._pick_device`` it prompted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optree
import pytest
import torch
from _models import (
    LR,
    bn_conv_net,
    conv_net,
    dropout_mlp,
    image_tasks,
    mse,
    naive_meta_grad,
    regression_tasks,
    xent,
)
from conftest import assert_trees_close, policy_id

import fmaml
from fmaml.app.main import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
TOL = {"rtol": 1e-9, "atol": 1e-11}  # float64 on another device: cuDNN sums in another order
POLICIES = ["store_all", "sqrt", "binomial", "auto", fmaml.Uniform(2)]


def _cuda(tree):
    return optree.tree_map(lambda t: t.to(CUDA), tree)


def _cpu(tree):
    return optree.tree_map(lambda t: t.cpu(), tree)


@pytest.mark.parametrize("policy", POLICIES, ids=policy_id)
@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("build", [conv_net, bn_conv_net], ids=["conv", "bn_conv"])
def test_meta_grad_on_cuda_equals_naive_cpu(policy, batching, build):
    k = 4
    model = build()
    tasks = image_tasks(torch.Generator().manual_seed(3))
    params = fmaml.params(model)
    ref_loss, ref_grad = naive_meta_grad(model, xent, params, tasks, k)
    model.to(CUDA)
    maml = fmaml.MAML(model, xent, inner_lr=LR, checkpoint=policy, batching=batching)
    loss, grads = maml.meta_grad(fmaml.params(model), _cuda(tasks), k)
    assert loss.device.type == "cuda" and all(g.device.type == "cuda" for g in grads.values())
    torch.testing.assert_close(loss.cpu(), ref_loss, **TOL)
    assert_trees_close(_cpu(grads), ref_grad, **TOL)


@pytest.mark.parametrize("policy", ["sqrt", "binomial", fmaml.Uniform(2)], ids=policy_id)
def test_dropout_random_numbers_are_replayed_on_cuda(policy):
    """Recomputed steps must draw the same CUDA random numbers as the forward sweep: a
    checkpointed meta-gradient equals store_all's with the same seed (and differs with another)."""
    k = 6
    model = dropout_mlp().to(CUDA)
    tasks = _cuda(regression_tasks(torch.Generator().manual_seed(9)))
    params = fmaml.params(model)

    def run(checkpoint, seed):
        maml = fmaml.MAML(model, mse, inner_lr=LR, checkpoint=checkpoint, batching="loop")
        torch.cuda.manual_seed(seed)
        return maml.meta_grad(params, tasks, k)

    _, expected = run("store_all", 11)
    _, grads = run(policy, 11)
    assert_trees_close(grads, expected, rtol=1e-12, atol=1e-14)
    _, other = run(policy, 12)
    pairs = zip(other.values(), expected.values(), strict=True)
    assert any(not torch.allclose(a, b) for a, b in pairs)


def test_scan_backward_on_cuda_equals_cpu():
    def step(c, x):
        h = torch.tanh(c["h"] @ c["w"] + x)
        return {"h": h, "w": c["w"]}, h.sum()

    gen = torch.Generator().manual_seed(0)
    init = {
        "h": torch.randn(3, 5, generator=gen, dtype=torch.float64),
        "w": torch.randn(5, 5, generator=gen, dtype=torch.float64) / 3,
    }
    xs = torch.randn(40, 3, 5, generator=gen, dtype=torch.float64)

    def loss(init, xs, policy):
        carry, ys = fmaml.scan(step, init, xs, checkpoint=policy)
        return carry["h"].square().sum() + ys.square().sum()

    expected = torch.func.grad(loss)(init, xs, "store_all")
    for policy in ("binomial", "sqrt", "auto"):
        got = torch.func.grad(loss)(_cuda(init), xs.to(CUDA), policy)
        assert_trees_close(_cpu(got), expected, **TOL)


def test_cli_train_sinusoid_on_cuda_and_resume(tmp_path: Path, capsys):
    common = ["train", "sinusoid", "--quiet", "--device", "cuda", "--eval-tasks", "20"]
    common += ["--save-every", "5", "--log-every", "5"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert main([*common, "--iterations", "20", "--out", str(whole)]) == 0
    assert main([*common, "--iterations", "10", "--out", str(halves)]) == 0
    resume = ["train", "sinusoid", "--quiet", "--resume", str(halves), "--iterations", "20"]
    assert main(resume) == 0
    out = capsys.readouterr().out
    assert "10 steps:" in out
    a = torch.load(whole / "params.pt", weights_only=True)
    b = torch.load(halves / "params.pt", weights_only=True)
    for name in a:
        assert a[name].device.type == "cpu"  # saved loadable anywhere
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    report = json.loads((whole / "eval.json").read_text())
    assert report["iterations"] == 20


def test_torchrun_nccl_one_rank(tmp_path: Path):
    """`fmaml train` under torchrun on one GPU: NCCL initialises, trains, evaluates, writes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    cmd += ["-m", "fmaml", "train", "sinusoid", "--quiet", "--device", "cuda"]
    cmd += ["--iterations", "10", "--eval-tasks", "20", "--out", str(out)]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["history"][0]["processes"] == 1
    assert (out / "params.pt").is_file() and (out / "eval.json").is_file()
