"""``fmaml train`` under ``torchrun``: the same run as one process, rank 0 alone writes.

Three real ``torchrun --nproc-per-node=2`` jobs (CPU, gloo, loopback) start at once beside a
single-process reference, because each costs a few seconds of torch imports:

- a sinusoid run of 2 iterations, resumed under torchrun to 4, against one process trained
  4 iterations from the same seed with the same meta-batch of 4 tasks: the meta-parameters
  agree to float32 summation-order tolerance (each rank sums the gradients of its 2 tasks, then
  the ranks average), and so does the sharded evaluation;
- a job whose rank 1 is started with another ``--inner-steps``: both ranks exit with status 2 and
  one line naming the differing option, before anything is written.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

_REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 120.0
COMMON = [
    "train",
    "sinusoid",
    "--meta-batch",
    "4",
    "--eval-tasks",
    "30",
    "--log-every",
    "1",
    "--save-every",
    "1",
    "--seed",
    "3",
    "--inner-steps",
    "2",
    "--checkpoint",
    "binomial:1",
]
# rank 1 of the mismatched job appends these (argparse: the last value wins)
_MISMATCH = ["--inner-steps", "3"]

_LAUNCH = """
import os, sys
from fmaml.__main__ import main
argv = sys.argv[1:]
if os.environ.get("RANK") == "1" and os.environ.get("FMAML_TEST_MISMATCH"):
    argv += {mismatch!r}
raise SystemExit(main(argv))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _torchrun(script: Path, argv: list[str], **env: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
        *argv,
    ]
    return subprocess.Popen(
        command,
        env=_env(**env),
        cwd=_REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _single(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fmaml", *argv],
        env=_env(),
        cwd=_REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, deadline: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"timed out after {LIMIT_S} s:\n{out}\n{err}")
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("torchrun")
    script = tmp / "launch.py"
    script.write_text(textwrap.dedent(_LAUNCH.format(mismatch=_MISMATCH)))
    deadline = time.monotonic() + LIMIT_S
    single = _single([*COMMON, "--iterations", "4", "--out", str(tmp / "single")])
    halves = _torchrun(script, [*COMMON, "--iterations", "2", "--out", str(tmp / "two")])
    mismatch = _torchrun(
        script,
        [*COMMON, "--iterations", "2", "--out", str(tmp / "mismatch")],
        FMAML_TEST_MISMATCH="1",
    )
    results: dict[str, object] = {
        "single": _finish(single, deadline),
        "halves": _finish(halves, deadline),
        "mismatch": _finish(mismatch, deadline),
    }
    resume = _torchrun(
        script, ["train", "sinusoid", "--resume", str(tmp / "two"), "--iterations", "4"]
    )
    results["resume"] = _finish(resume, deadline + 30)
    results["tmp"] = tmp
    return results


def _ok(result: tuple[int, str, str]) -> tuple[str, str]:
    status, out, err = result
    assert status == 0, f"exit {status}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_processes_equal_one(runs):
    _ok(runs["single"])
    _ok(runs["halves"])
    _ok(runs["resume"])
    tmp = runs["tmp"]
    one, two = _load(tmp / "single" / "params.pt"), _load(tmp / "two" / "params.pt")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # ... and not trivially: training moved the parameters
    first = _load(tmp / "two" / "state.pt")
    assert first["iteration"] == 4
    losses, reference = (_records(tmp / name / "metrics.jsonl") for name in ("two", "single"))
    assert [r["iteration"] for r in losses] == [1, 2, 3, 4]
    for a, b in zip(losses, reference, strict=True):
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-5)


def test_sharded_evaluation_equals_one_process(runs):
    tmp = runs["tmp"]
    one = json.loads((tmp / "single" / "eval.json").read_text())
    two = json.loads((tmp / "two" / "eval.json").read_text())
    for k, stats in one["splits"]["held_out"]["steps"].items():
        other = two["splits"]["held_out"]["steps"][k]
        assert other["n"] == stats["n"] == 30  # every task, gathered from both ranks
        assert other["mean"] == pytest.approx(stats["mean"], rel=1e-4)
        assert other["std"] == pytest.approx(stats["std"], rel=1e-4)


def test_only_rank_zero_prints_and_writes(runs):
    out, _ = _ok(runs["halves"])
    assert out.count("sinusoid 10-shot: query MSE") == 1
    assert out.count("trained 2 iterations") == 1
    assert "2 processes (gloo)" in out
    config = json.loads((runs["tmp"] / "two" / "config.json").read_text())
    assert [h["processes"] for h in config["history"]] == [2, 2]
    # no stray temporary files from a second writer
    assert not [p for p in (runs["tmp"] / "two").iterdir() if p.name.startswith(".")]


def test_mismatched_ranks_are_reported_before_anything_is_written(runs):
    status, _, err = runs["mismatch"]
    assert status != 0
    lines = [line for line in err.splitlines() if "differing keys" in line]
    assert len(lines) == 1, err  # printed once (rank 0), not once per rank
    assert "'inner_steps' (rank 0: 2, rank 1: 3)" in lines[0]
    assert not (runs["tmp"] / "mismatch").exists()
