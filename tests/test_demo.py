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
    assert "Checkpoint plans for a scan of 100 steps" in out
    assert "default policy fmaml.Auto(): snapshots" in out
    assert (
        f'"binomial": snapshots {binomial.snapshots}, step evaluations {binomial.evaluations}, '
        f"evaluations per step {binomial.evaluations / 100:.2f}" in out
    )
    assert out.count("Plan for a scan of length 100") == 2

    rows = {
        m[0]: m for m in re.findall(r"^  (\w+) +([\d.]+) +(\S+) +(\d+) +(\d+) +(\d+)", out, re.M)
    }
    assert set(rows) == {"store_all", "auto", "binomial"}
    for name, norm, diff, forward, _recomputed, graph in rows.values():
        assert float(diff) < 1e-10, name
        assert float(norm) > 0, name
        assert (int(forward), int(graph)) == (25, 25), name
    assert int(rows["store_all"][4]) == 0
    assert int(rows["binomial"][4]) == fmaml.binomial_cost(25, 5) - 24  # recomputed steps

    worst = re.search(r"max abs difference vs store_all: (\S+)", out)
    assert worst is not None
    assert float(worst[1]) < 1e-10


def test_demo_options(capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--length", "10", "--steps", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "Checkpoint plans for a scan of 10 steps" in out
    assert "3 inner SGD steps" in out


def test_cli_needs_a_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
