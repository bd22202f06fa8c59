"""The ``fmaml`` command line: ``fmaml plan`` and every error path of ``fmaml train``.

Each error is one line on stderr that names the problem and the fix, the exit status is 2 (usage)
and nothing is written: the run directory is not created.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fmaml
from fmaml.app.main import main

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "all_runs.zip").is_file(), reason=f"no Omniglot data in {OMNIGLOT}"
)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def _rows(out: str) -> dict[str, list[str]]:
    """``fmaml plan``'s table: the policy name (first word) -> the numeric columns."""
    rows = {}
    for line in out.splitlines():
        parts = line[2:].split()
        if parts and parts[0].split(":")[0] in ("store_all", "sqrt", "binomial", "auto"):
            rows[parts[0].split(":")[0]] = line
    return rows


# --------------------------------------------------------------------------------------------
# fmaml plan


def test_plan_table(capsys):
    status, out, err = _run(["plan", "--length", "100", "--snapshots", "5"], capsys)
    assert status == 0 and err == ""
    assert out.startswith("Checkpoint plans for 100 inner steps; carry 6.9 KiB (the sinusoid MLP")
    assert "evals/step  (forward + recomputed + with graph) / K" in out  # the convention, named
    rows = _rows(out)
    assert list(rows) == ["store_all", "sqrt", "binomial", "auto"]
    store_all = rows["store_all"].split()
    assert store_all[1:6] == ["-", "0", "0", "100", "1.00"]
    graph = _sinusoid_step_graph()
    assert f"one step's graph {graph / 1024:.1f} KiB" in out.splitlines()[0]
    kept = 100 * (graph + 7044) / 1024**2  # each graph and the carry its step started from
    assert rows["store_all"].endswith(f"100 step graphs, {kept:.1f} MiB")
    binomial = rows["binomial"].split()
    assert rows["binomial"].startswith("* binomial:5")  # the default --policy is marked
    recomputed = fmaml.binomial_cost(100, 5) - 99
    per_step = (100 + recomputed + 100) / 100
    assert binomial[2:7] == ["5", "100", str(recomputed), "100", f"{per_step:.2f}"]
    assert binomial[7:9] == [f"{5 * 7044 / 1024:.1f}", "KiB"]
    assert rows["binomial"].endswith(f"+ one step graph {graph / 1024:.1f} KiB")
    assert rows["auto"].split()[:2] == ["auto:5", "5"]  # at most 5 snapshots: it checkpoints
    assert "The plan of binomial:5 (*): 10 actions in the forward pass, " in out


def test_plan_labels_are_spellings_and_the_snapshots_column_is_the_plans(capsys):
    """A label never states a snapshot count that the column contradicts (K=100: 99 used)."""
    status, out, _ = _run(
        ["plan", "-k", "100", "--policy", "auto", "--graph-bytes", "1000000"], capsys
    )
    assert status == 0
    auto = _rows(out)["auto"].split()  # 100 graphs of 1 MB do not fit 64 MiB: snapshots
    assert auto[:4] == ["*", "auto", "99", "100"] and auto[6] == "2.00"
    status, out, _ = _run(["plan", "-k", "100", "--snapshots", "100"], capsys)
    assert _rows(out)["binomial"].split()[1:3] == ["binomial:100", "99"]


def test_plan_of_one_step(capsys):
    status, out, _ = _run(["plan", "--length", "1", "--policy", "auto"], capsys)
    assert status == 0
    assert out.startswith("Checkpoint plans for 1 inner step; carry")
    assert "steps" not in out.splitlines()[0] and "1 step graphs" not in out
    assert _rows(out)["auto"].startswith("* auto ")
    assert "1 step graph, " in _rows(out)["auto"]
    assert "auto (*) has no plan" in out


def test_plan_conv4_auto_and_model_bytes(capsys):
    status, out, _ = _run(["plan", "-k", "1000", "--model", "conv4", "--policy", "auto"], capsys)
    assert status == 0
    n = sum(p.numel() for p in _conv4().parameters())
    assert f"conv4-64, 20-way: {n:,} float32 parameters" in out
    graph = _conv4_step_graph()
    # the default Auto(): 64 MiB for one step graph and the snapshots
    assert _rows(out)["auto"].split()[:3] == ["*", "auto", str((64 * 2**20 - graph) // (4 * n))]
    status, out, _ = _run(["plan", "-k", "10", "--model-bytes", "1000", "--tasks", "4"], capsys)
    assert status == 0 and "carry 3.9 KiB (1,000 bytes (--model-bytes) x 4 tasks)" in out


def _conv4():
    from fmaml.app.jobs.omniglot import DEFAULTS, build_model

    return build_model(DEFAULTS)


def _step_graph(model, x, y, loss) -> int:
    """One inner step's graph, measured by hand (saved tensors beyond the parameters)."""
    from fmaml._footprint import SavedBytes

    p = {n: t.detach().requires_grad_() for n, t in model.named_parameters()}
    with SavedBytes(list(p.values())) as saved:
        value = loss(torch.func.functional_call(model, p, (x,)), y)
        g = torch.autograd.grad(value, list(p.values()), create_graph=True)
        [torch.add(t, gi, alpha=-0.1) for t, gi in zip(p.values(), g, strict=True)]
    return saved.bytes


def _sinusoid_step_graph() -> int:
    from fmaml.app.jobs.sinusoid import DEFAULTS, build_model

    x = torch.zeros(DEFAULTS["k_shot"], 1)
    return _step_graph(build_model(DEFAULTS), x, x, torch.nn.functional.mse_loss)


def _conv4_step_graph() -> int:
    x = torch.zeros(20, 1, 28, 28)
    y = torch.zeros(20, dtype=torch.int64)
    return _step_graph(_conv4(), x, y, torch.nn.functional.cross_entropy)


@pytest.mark.parametrize("policy", ["sqrt", "binomial", "auto"])
def test_plan_counts_match_a_real_scan(policy: str, capsys):
    """The table's forward/recomputed/with-graph columns are what fmaml.scan really does."""
    k, snapshots = 13, 3
    status, out, _ = _run(["plan", "-k", str(k), "--snapshots", str(snapshots)], capsys)
    assert status == 0
    columns = _rows(out)[policy].split()
    numbers = [c for c in columns if c.isdigit()]
    forward, recomputed, graph = map(int, numbers[-3:])

    from fmaml.app.plan import plan_policies

    x = torch.tensor(0.5, dtype=torch.float64)
    with fmaml.record_scan() as stats:
        torch.func.grad(
            lambda c: fmaml.scan(
                lambda c, _: (torch.sin(c) * 1.1, None),
                c,
                length=k,
                checkpoint=plan_policies(k, snapshots)[policy],
            )[0]
        )(x)
    assert stats.forward_evaluations == forward  # the plan's forward sweep and the last step
    assert stats.recomputations == recomputed
    assert stats.graph_evaluations == graph == k


def test_python_dash_m_fmaml_plan():
    result = subprocess.run(
        [sys.executable, "-m", "fmaml", "plan", "--length", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "* binomial                         3" in result.stdout


# --------------------------------------------------------------------------------------------
# error paths: one line, exit status 2, nothing written


def _assert_usage_error(status: int, err: str, *needles: str) -> None:
    assert status == 2
    assert err.count("\n") == 1, err
    assert " error: " in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--eval-steps", "1,x"], ["--eval-steps", "0,1,10"]),
        (["--eval-steps", "-1"], ["--eval-steps", ">= 0"]),
        (["--checkpoint", "everything"], ["--checkpoint", "unknown policy", "binomial:S"]),
        (["--checkpoint", "binomial:0"], ["the number of snapshots, an integer >= 1, got '0'"]),
        (["--checkpoint", "uniform:x"], ["the steps between snapshots", "uniform:4"]),
        (["--checkpoint", "store_all:2"], ["store_all takes no number"]),
        (["--inner-lr", "-0.1"], ["--inner-lr", "positive"]),
        (["--iterations", "0"], ["--iterations", ">= 1"]),
        (["--device", "tpu"], ["--device", "cpu, cuda or cuda:N"]),
        (["--device"], ["--device: expected one argument"]),
        (["--bogus"], ["unrecognized arguments: --bogus"]),
    ],
)
def test_bad_option_values(tmp_path: Path, capsys, argv, needles):
    out = tmp_path / "run"
    status, _, err = _run(["train", "sinusoid", "--out", str(out), *argv], capsys)
    _assert_usage_error(status, err, *needles)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_unavailable(tmp_path: Path, capsys):
    out = tmp_path / "run"
    status, _, err = _run(["train", "sinusoid", "--device", "cuda", "--out", str(out)], capsys)
    _assert_usage_error(status, err, "CUDA is not available", "--device cpu")
    assert not out.exists()


def test_missing_data_dir(tmp_path: Path, capsys, monkeypatch):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere"
    argv = ["train", "omniglot", "--data-dir", str(missing), "--out", str(out)]
    status, _, err = _run(argv, capsys)
    _assert_usage_error(status, err, str(missing), "does not exist", "--data-dir")
    assert not out.exists()
    # a relative path is from the working directory, and the error shows where it looked
    monkeypatch.chdir(tmp_path)
    status, _, err = _run(["train", "omniglot", "--data-dir", "rel/path", "--out", "r"], capsys)
    _assert_usage_error(status, err, f"--data-dir rel/path: {tmp_path}/rel/path does not exist")
    status, _, err = _run(["train", "omniglot", "--out", str(out)], capsys)
    _assert_usage_error(status, err, "--data-dir is required")
    assert not out.exists()


@needs_omniglot
def test_a_relative_data_dir_is_from_the_working_directory(tmp_path: Path, capsys, monkeypatch):
    (tmp_path / "data").symlink_to(OMNIGLOT)
    monkeypatch.chdir(tmp_path)
    argv = ["train", "omniglot", "--data-dir", "data", "--n-way", "2000", "--out", "run"]
    status, _, err = _run(argv, capsys)  # the data was read: the episodes are checked
    _assert_usage_error(status, err, "--n-way 2000 exceeds the 872 training classes")


@pytest.mark.skipif(
    not (REPO / ".venv" / ".fmaml-installed").is_file()
    or Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
    reason="runs scripts/dev, which would build .venv",
)
def test_scripts_dev_runs_the_command_where_the_user_stands(tmp_path: Path):
    script = "import os, sys; print(os.getcwd()); print(sys.prefix)"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "dev"), "python", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    cwd, prefix = result.stdout.splitlines()
    assert Path(cwd).resolve() == tmp_path.resolve()
    assert Path(prefix).resolve() == (REPO / ".venv").resolve()


def test_data_dir_without_zips(tmp_path: Path, capsys):
    out = tmp_path / "run"
    (tmp_path / "data").mkdir()
    argv = ["train", "omniglot", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    status, _, err = _run(argv, capsys)
    _assert_usage_error(status, err, "no images_background*.zip", "download")
    assert not out.exists()


def test_zip_in_an_unexpected_layout(tmp_path: Path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    with zipfile.ZipFile(data / "images_background.zip", "w") as z:
        z.writestr("images_background/Latin/a.png", b"not here")
    argv = ["train", "omniglot", "--data-dir", str(data), "--out", str(out)]
    status, _, err = _run(argv, capsys)
    _assert_usage_error(status, err, "unexpected layout", "images_background/Latin/a.png")
    assert not out.exists()


@needs_omniglot
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--n-way", "2000"], ["--n-way 2000 exceeds the 872 training classes", "smaller"]),
        (["--n-way", "30", "--val-chars", "5"], ["exceeds the 20 validation classes"]),
        (["--val-chars", "242"], ["--val-chars 242 leaves no training characters"]),
        (["--k-shot", "10", "--queries", "15"], ["exceeds the 20 drawings"]),
    ],
)
def test_omniglot_impossible_episodes(tmp_path: Path, capsys, argv, needles):
    out = tmp_path / "run"
    base = ["train", "omniglot", "--data-dir", str(OMNIGLOT), "--out", str(out)]
    status, _, err = _run([*base, *argv], capsys)
    _assert_usage_error(status, err, *needles)
    assert not out.exists()


@needs_omniglot
def test_missing_official_runs(tmp_path: Path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    for z in OMNIGLOT.glob("images_background*.zip"):
        (data / z.name).symlink_to(z)
    argv = ["train", "omniglot", "--data-dir", str(data), "--out", str(out)]
    status, _, err = _run(argv, capsys)
    _assert_usage_error(status, err, "all_runs.zip does not exist", "--no-official-runs")
    assert not out.exists()


def test_unwritable_output_directory(tmp_path: Path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, _, err = _run(["train", "sinusoid", "--out", str(blocker / "run")], capsys)
    _assert_usage_error(status, err, "cannot create the run directory", "is not a directory")
    status, _, err = _run(["train", "sinusoid", "--out", str(blocker)], capsys)
    _assert_usage_error(status, err, "is a file")


def test_output_directory_in_use(tmp_path: Path, capsys):
    (tmp_path / "old.txt").write_text("x")
    status, _, err = _run(["train", "sinusoid", "--out", str(tmp_path)], capsys)
    _assert_usage_error(status, err, "already holds files", f"--resume {tmp_path}")
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "sin"
    argv = ["train", "sinusoid", "--quiet", "--iterations", "3", "--eval-tasks", "3"]
    assert main([*argv, "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--inner-lr", "0.02"], ["trained with --inner-lr 0.01, not 0.02", "drop --inner-lr"]),
        (["--meta-batch", "5"], ["trained with --meta-batch 25, not 5"]),
        (["--seed", "1"], ["trained with --seed 0, not 1"]),
        (["--out", "elsewhere"], ["name different directories", "drop --out"]),
    ],
)
def test_incompatible_resume(finished_run: Path, capsys, argv, needles):
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()}
    status, _, err = _run(["train", "sinusoid", "--resume", str(finished_run), *argv], capsys)
    _assert_usage_error(status, err, f"--resume {finished_run}" if argv[0] != "--out" else "")
    for needle in needles:
        assert needle in err
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()} == before


def test_resume_of_the_wrong_task(finished_run: Path, capsys):
    argv = ["train", "omniglot", "--resume", str(finished_run)]
    status, _, err = _run(argv, capsys)
    _assert_usage_error(status, err, "is a 'sinusoid' run", "fmaml train sinusoid --resume")


def test_resume_of_something_else(tmp_path: Path, capsys):
    status, _, err = _run(["train", "sinusoid", "--resume", str(tmp_path / "none")], capsys)
    _assert_usage_error(status, err, "no such directory")
    status, _, err = _run(["train", "sinusoid", "--resume", str(tmp_path)], capsys)
    _assert_usage_error(status, err, "holds no run yet", f"fmaml train sinusoid --out {tmp_path}")
    (tmp_path / "notes.txt").write_text("mine")
    status, _, err = _run(["train", "sinusoid", "--resume", str(tmp_path)], capsys)
    _assert_usage_error(status, err, "not a resumable run directory (no config.json)")


def test_resume_may_change_the_evaluation(finished_run: Path, capsys):
    argv = ["train", "sinusoid", "--quiet", "--resume", str(finished_run), "--eval-steps", "2"]
    status, out, _ = _run(argv, capsys)
    assert status == 0 and "  2 steps:" in out and "trained 3 iterations" in out


def test_help_lists_every_option(capsys):
    status, out, _ = _run(["train", "omniglot", "--help"], capsys)
    assert status == 0
    for option in (
        "--inner-steps",
        "--eval-steps",
        "--inner-lr",
        "--checkpoint",
        "--meta-batch",
        "--meta-lr",
        "--iterations",
        "--time-budget",
        "--seed",
        "--device",
        "--out",
        "--quiet",
        "--resume",
        "--save-every",
        "--batching",
        "--data-dir",
        "--n-way",
        "--width",
    ):
        assert option in out


@pytest.mark.parametrize(
    ("given", "saved", "handed"),
    [
        ([], "auto", False),  # sinusoid's default; "auto" of a one-step run compiles nothing
        (["--compile"], "on", True),
        (["--compile", "off"], "off", False),
    ],
)
def test_compile_option_reaches_the_run(given, saved, handed, tmp_path, capsys, monkeypatch):
    """``--compile [WHEN]``: saved in config.json and handed to fmaml.MAML (one meta-step runs
    eagerly, as a compiled structure's first call does, so nothing is compiled here)."""
    import fmaml

    seen = []
    init = fmaml.MAML.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("compile", False))
        init(self, *args, **kwargs)

    monkeypatch.setattr(fmaml.MAML, "__init__", spy)
    run = tmp_path / "run"
    argv = ["train", "sinusoid", "--iterations", "1", "--eval-tasks", "2", "--out", str(run)]
    status, out, _ = _run([*argv, *given], capsys)
    assert status == 0
    assert json.loads((run / "config.json").read_text())["compile"] == saved
    assert seen[0] == handed
    assert (f"compile {saved}, " in out) == (saved != "off")


def test_compile_auto_compiles_long_runs_only():
    """A compilation costs tens of seconds: ``--compile auto`` hands ``"auto"`` to fmaml.MAML
    only for a run with enough meta-steps left to win it back (or no iteration limit)."""
    from fmaml.app.loop import AUTO_COMPILE_ITERATIONS as N
    from fmaml.app.loop import compile_option

    assert compile_option("auto", N) == "auto"
    assert compile_option("auto", None) == "auto"
    assert compile_option("auto", N - 1) is False
    assert compile_option("auto", N + 5, first=6) is False  # resumed near its end
    assert compile_option("on", 1) is True
    assert compile_option("off", None) is False


def test_compile_option_rejects_other_values(capsys):
    status, _, err = _run(["train", "sinusoid", "--compile", "always"], capsys)
    _assert_usage_error(status, err, "--compile", "invalid choice: 'always'")
