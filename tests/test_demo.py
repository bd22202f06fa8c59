"""``fmaml demo`` runs in-process, prints both plans and checkpointed meta-gradients that agree."""

from __future__ import annotations

import re

import pytest

import fmaml
from fmaml.app.main import main


def test_demo_prints_plans_and_agreeing_meta_gradients(capsys: pytest.CaptureFixture) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out

    binomial = fmaml.binomial_plan(100, 7)
    recomputed = binomial.evaluations - 99
    assert "Checkpoint plans for a scan of 100 steps" in out
    assert "evals/step = (forward + recomputed + with graph) / K" in out
    assert (
        f'"binomial": forward 100, recomputed {recomputed}, with graph 100: '
        f"{(200 + recomputed) / 100:.2f} evals/step" in out
    )
    assert "default policy fmaml.Auto(): forward 100, recomputed 0, with graph 100: 2.00" in out
    assert '"store_all": forward 0, recomputed 0, with graph 100: 1.00 evals/step' in out

    rows = {
        m[0]: m
        for m in re.findall(r"^  (\w+) +([\d.]+) +(\S+) +(\d+) +(\d+) +(\d+) +([\d.]+)", out, re.M)
    }
    assert set(rows) == {"store_all", "auto", "binomial"}
    for name, norm, diff, forward, recomputed, graph, per_step in rows.values():
        assert float(diff) < 1e-10, name
        assert float(norm) > 0, name
        assert int(graph) == 25, name
        # the measured counts give the same evals/step as fmaml plan's for that policy
        assert f"{(int(forward) + int(recomputed) + int(graph)) / 25:.2f}" == per_step, name
    assert rows["store_all"][3:7] == ("0", "0", "25", "1.00")
    assert rows["auto"][3:7] == ("25", "0", "25", "2.00")
    assert int(rows["binomial"][4]) == fmaml.binomial_cost(25, 5) - 24  # recomputed steps

    worst = re.search(r"max abs difference vs store_all: (\S+)", out)
    assert worst is not None
    assert float(worst[1]) < 1e-10


def test_demo_and_plan_report_the_same_evals_per_step(capsys: pytest.CaptureFixture) -> None:
    """One convention: fmaml plan's row for a policy and fmaml demo's line for it agree."""
    assert main(["plan", "-k", "100", "--model-bytes", "14088"]) == 0
    plan = capsys.readouterr().out
    assert main(["demo", "--steps", "2"]) == 0
    demo = capsys.readouterr().out
    for name, label in (("auto", "default policy fmaml.Auto()"), ("binomial", '"binomial"')):
        row = next(line for line in plan.splitlines() if line[2:].split()[:1] == [name])
        per_step = row.split()[-3]  # then the memory, "1.3 MiB"
        line = next(line for line in demo.splitlines() if line.startswith(f"{label}: "))
        assert f": {per_step} evals/step;" in line, (row, line)


def test_demo_options(capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--length", "10", "--steps", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "Checkpoint plans for a scan of 10 steps" in out
    assert "3 inner SGD steps" in out
    assert main(["demo", "--length", "1", "--steps", "1"]) == 0  # no plan for auto at K = 1
    assert "default policy fmaml.Auto(): forward 0, recomputed 0, with graph 1: 1.00" in (
        capsys.readouterr().out
    )


def test_cli_needs_a_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
