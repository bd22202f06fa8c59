"""``fmaml train``: end-to-end runs, the files of a run directory, resume, atomic saves.

Runs are tiny (a few dozen sinusoid iterations, a few Omniglot iterations of a narrow conv4) and
go through ``fmaml.__main__.main`` in-process. Omniglot tests read the official zips from
``../shared/data/omniglot`` next to the repository and are skipped when it is absent.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from fmaml.app import evaluation, files, progress
from fmaml.app.main import main

OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "all_runs.zip").is_file(), reason=f"no Omniglot data in {OMNIGLOT}"
)

SIN = ["train", "sinusoid", "--quiet", "--eval-tasks", "20", "--log-every", "5"]
OMNI = [
    "train",
    "omniglot",
    "--quiet",
    "--data-dir",
    str(OMNIGLOT),
    "--n-way",
    "5",
    "--width",
    "4",
    "--meta-batch",
    "2",
    "--eval-tasks",
    "3",
    "--log-every",
    "1",
    "--eval-steps",
    "1,3",
]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = _load(a / "params.pt"), _load(b / "params.pt")
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    sa, sb = _load(a / "state.pt"), _load(b / "state.pt")
    assert sa["iteration"] == sb["iteration"]
    assert torch.equal(sa["task_rng"], sb["task_rng"])
    for key, value in sa["optimizer"]["state"].items():
        for name, t in value.items():
            assert torch.equal(t, sb["optimizer"]["state"][key][name]), (key, name)


def _losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["iteration"], r["meta_loss"]) for r in map(json.loads, lines)]


# --------------------------------------------------------------------------------------------
# sinusoid


def test_sinusoid_run_writes_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run = tmp_path / "run"
    argv = [*SIN, "--iterations", "30", "--save-every", "10", "--out", str(run)]
    status, out, err = _run(argv, capsys)
    assert status == 0, err
    assert err == ""  # --quiet: no progress line
    lines = out.splitlines()
    assert lines[0].startswith("sinusoid 10-shot: query MSE on 20 held-out tasks")
    assert [line.split(":")[0].strip() for line in lines[1:4]] == ["0 steps", "1 step", "10 steps"]
    assert all("±" in line for line in lines[1:4])
    assert lines[-1] == f"run directory: {run}"

    names = {p.name for p in run.iterdir()}
    assert names == {
        "config.json",
        "metrics.jsonl",
        "metrics.csv",
        "params.pt",
        "state.pt",
        "eval.json",
        "training_curve.png",
        "adaptation.png",
    }
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert set(records[0]) == {"iteration", "meta_loss", "time", "cpu_time"}
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "iteration,meta_loss,time,cpu_time"
    assert len(csv_lines) == 7

    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "sinusoid"
    assert config["iterations"] == 30 and config["inner_lr"] == 0.01
    assert config["eval_inner_lr"] == config["inner_lr"]
    assert config["checkpoint"] == "auto" and config["parameters"] == 1761

    from fmaml.app.jobs.sinusoid import build_model

    model = build_model(config)
    model.load_state_dict(_load(run / "params.pt"))  # strict: every key, nothing else

    state = _load(run / "state.pt")
    assert state["iteration"] == 30
    assert {"params", "optimizer", "torch_rng", "python_rng", "task_rng"} <= set(state)

    report = json.loads((run / "eval.json").read_text())
    assert report["iterations"] == 30 and report["stopped_by"] == "iterations"
    steps = report["splits"]["held_out"]["steps"]
    assert list(steps) == ["0", "1", "10"]
    for stats in steps.values():
        assert stats["n"] == 20 and stats["ci95"] > 0
        assert stats["ci95"] == pytest.approx(1.96 * stats["std"] / 20**0.5)
    for png in ("training_curve.png", "adaptation.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sinusoid_resume_is_bitwise_identical(tmp_path: Path, capsys):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    common = [*SIN, "--save-every", "7", "--eval-tasks", "5"]
    assert main([*common, "--iterations", "24", "--out", str(whole)]) == 0
    assert main([*common, "--iterations", "12", "--out", str(halves)]) == 0
    assert _load(halves / "state.pt")["iteration"] == 12
    assert (
        main(["train", "sinusoid", "--quiet", "--resume", str(halves), "--iterations", "24"]) == 0
    )
    capsys.readouterr()
    _assert_same_params(whole, halves)
    assert _losses(whole) == _losses(halves)
    config = json.loads((halves / "config.json").read_text())
    assert [h["resumed"] for h in config["history"]] == [False, True]


def test_sinusoid_resume_after_a_signal(tmp_path: Path, capsys, monkeypatch):
    """SIGINT mid-run saves the state between iterations; resuming finishes the same run."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    common = [*SIN, "--iterations", "20", "--save-every", "100"]
    assert main([*common, "--out", str(whole)]) == 0

    from fmaml.app.jobs.sinusoid import SinusoidJob

    sample, calls = SinusoidJob.sample, []

    def sample_then_interrupt(self, generator):
        calls.append(1)
        if len(calls) == 13:
            signal.raise_signal(signal.SIGINT)
        return sample(self, generator)

    monkeypatch.setattr(SinusoidJob, "sample", sample_then_interrupt)
    status, _, err = _run([*common, "--out", str(stopped)], capsys)
    assert status == 130
    assert "stopped by SIGINT at iteration 13; state saved" in err
    assert f"--resume {stopped}" in err
    assert _load(stopped / "state.pt")["iteration"] == 13
    assert not (stopped / "eval.json").exists()
    monkeypatch.setattr(SinusoidJob, "sample", sample)
    assert main(["train", "sinusoid", "--quiet", "--resume", str(stopped)]) == 0
    _assert_same_params(whole, stopped)
    assert _losses(whole) == _losses(stopped)


def test_a_crash_between_write_and_rename_keeps_the_last_state(tmp_path, capsys, monkeypatch):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    common = [*SIN, "--iterations", "20", "--save-every", "10", "--eval-tasks", "5"]
    assert main([*common, "--out", str(whole)]) == 0

    replace, state_saves = os.replace, []

    def flaky_replace(src, dst):
        if Path(dst).name == "state.pt":
            state_saves.append(dst)
            if len(state_saves) == 3:  # saves at 0, 10, 20: the process "dies" at 20
                raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(files.os, "replace", flaky_replace)
    status, _, err = _run([*common, "--out", str(crashed)], capsys)
    monkeypatch.setattr(files.os, "replace", replace)
    assert status == 2
    assert err.count("\n") == 1 and f"cannot write {crashed}/state.pt: No space left" in err
    assert f"--resume {crashed}" in err
    assert _load(crashed / "state.pt")["iteration"] == 10  # the previous state, intact
    assert not [p.name for p in crashed.iterdir() if p.name.endswith(".tmp")]
    assert main(["train", "sinusoid", "--quiet", "--resume", str(crashed)]) == 0
    capsys.readouterr()
    _assert_same_params(whole, crashed)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path, monkeypatch):
    path = tmp_path / "state.pt"
    files.atomic_save({"iteration": 1}, path)

    def crash(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        files.atomic_save({"iteration": 2}, path)
    assert torch.load(path, weights_only=True) == {"iteration": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_time_budget_stops_training(tmp_path: Path, capsys):
    run = tmp_path / "run"
    status, out, _ = _run([*SIN, "--time-budget", "0.002", "--out", str(run)], capsys)
    assert status == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["stopped_by"] == "time budget"
    assert report["iterations"] >= 1 and report["train_time_s"] >= 0.12
    assert json.loads((run / "config.json").read_text())["iterations"] is None
    assert _losses(run)[-1][0] == report["iterations"]
    assert f"trained {report['iterations']} iterations (time budget reached) in" in out


def test_progress_line_and_header(tmp_path: Path, capsys):
    argv = ["train", "sinusoid", "--iterations", "5", "--eval-tasks", "5"]
    status, out, err = _run([*argv, "--out", str(tmp_path / "run")], capsys)
    assert status == 0
    assert out.startswith("fmaml train sinusoid: sinusoid regression, 10-shot")
    assert "5/5 [" in err and "it/s] meta-loss" in err


def test_progress_refreshes_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    bar = progress.Progress(total=100, budget_s=None, start=0, enabled=True, stream=stream)
    bar.update(10, 0.5, elapsed=1.0, force=True)
    bar.close(100, 0.25, elapsed=2.0)
    text = stream.getvalue()
    assert text.startswith("\r") and text.count("\r") == 2 and text.endswith("\n")
    assert " 10%|██" in text and "100/100" in text and "meta-loss 0.2500" in text


def test_interval_is_the_normal_95_percent_interval():
    stats = evaluation.interval(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item()
    expected = {"mean": 2.5, "ci95": 1.96 * std / 2, "std": std, "n": 4, "nonfinite": 0}
    assert stats == pytest.approx(expected)
    diverged = evaluation.interval(torch.tensor([1.0, 2.0, 3.0, 4.0, float("inf"), float("nan")]))
    assert diverged == pytest.approx({**expected, "nonfinite": 2})


# --------------------------------------------------------------------------------------------
# Omniglot


@needs_omniglot
def test_omniglot_run_and_resume(tmp_path: Path, capsys):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    status, out, err = _run([*OMNI, "--iterations", "4", "--out", str(whole)], capsys)
    assert status == 0, err
    assert out.splitlines()[0].startswith("Omniglot 5-way 1-shot: query accuracy")
    assert "validation (3 tasks):" in out and "official runs: skipped" in out
    report = json.loads((whole / "eval.json").read_text())
    val = report["splits"]["validation"]["steps"]
    assert list(val) == ["1", "3"] and all(0 <= s["mean"] <= 1 for s in val.values())
    assert report["splits"]["official_runs"]["steps"] == {}
    config = json.loads((whole / "config.json").read_text())
    assert config["data"]["characters"] == 242
    assert config["data"]["train_classes"] == (242 - 24) * 4
    from fmaml.app.jobs.omniglot import build_model

    build_model(config).load_state_dict(_load(whole / "params.pt"))
    assert (whole / "training_curve.png").is_file()

    assert main([*OMNI, "--iterations", "2", "--out", str(halves)]) == 0
    resume = ["train", "omniglot", "--quiet", "--resume", str(halves), "--iterations", "4"]
    assert main(resume) == 0
    capsys.readouterr()
    _assert_same_params(whole, halves)


@needs_omniglot
def test_omniglot_official_runs_20_way(tmp_path: Path, capsys):
    argv = [*OMNI, "--n-way", "20", "--iterations", "1", "--val-chars", "0"]
    status, out, err = _run([*argv, "--out", str(tmp_path / "run")], capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "validation" not in report["splits"]
    runs = report["splits"]["official_runs"]["steps"]
    assert list(runs) == ["1", "3"] and all(s["n"] == 20 for s in runs.values())
    assert "official runs (20 tasks):" in out


def test_the_checkpoint_policy_does_not_change_the_result(tmp_path: Path, capsys):
    """Checkpointing is exact: store_all and a 2-snapshot binomial schedule train the same."""
    base = [*SIN, "--iterations", "6", "--inner-steps", "4", "--eval-tasks", "5"]
    for policy in ("store_all", "binomial:2"):
        assert main([*base, "--checkpoint", policy, "--out", str(tmp_path / policy)]) == 0
    capsys.readouterr()
    a = _load(tmp_path / "store_all" / "params.pt")
    b = _load(tmp_path / "binomial:2" / "params.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_without_matplotlib_there_are_no_figures(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    run = tmp_path / "run"
    status, out, _ = _run([*SIN, "--iterations", "5", "--out", str(run)], capsys)
    assert status == 0
    assert "matplotlib is not installed, so no figures" in out
    assert not list(run.glob("*.png")) and (run / "eval.json").is_file()
