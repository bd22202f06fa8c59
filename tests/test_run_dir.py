"""Run directories that never wedge and never lose records: faults injected, outcomes asserted.

Every fault (a SIGKILL at a chosen point, a damaged ``config.json``/``state.pt``/metrics log, a
read-only directory, a full disk, Ctrl-C or SIGTERM outside the training loop, a second process)
ends in one of: a run directory that a resume or a new run continues to the same result as an
uninterrupted run; or one line on stderr with exit status 2 that says what to do, with the run
directory left as it was. No logged record is lost without a word.

Runs are tiny sinusoid runs (20 iterations, a save every 10, a record every 5). The SIGKILLs are
real: a child process kills itself at a deterministic point (a patched ``os.replace`` or
``write_json``). A real full file system and a real read-only mount are made in a private mount
namespace (``unshare``) where the machine allows it; in-process tests simulate the same errors
everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fmaml.app import rundir
from fmaml.app import train as train_command
from fmaml.app.files import WriteError
from fmaml.app.jobs.sinusoid import SinusoidJob
from fmaml.app.main import main

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
ARGS = ["--quiet", "--eval-tasks", "5", "--log-every", "5", "--save-every", "10"]
RUN = ["train", "sinusoid", *ARGS, "--iterations", "20"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def _resume(run: Path, *more: str) -> list[str]:
    return ["train", "sinusoid", "--quiet", "--resume", str(run), *more]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["iteration"], r["meta_loss"]) for r in _records(run)]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


def _assert_same_run(a: Path, b: Path) -> None:
    """Same meta-parameters, Adam state, iteration and metrics: the same run."""
    pa, pb = _load(a / "params.pt"), _load(b / "params.pt")
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    sa, sb = _load(a / "state.pt"), _load(b / "state.pt")
    assert sa["iteration"] == sb["iteration"]
    for name in sa["params"]:
        assert torch.equal(sa["params"][name], pb[name]), name  # params.pt agrees with state
    for key, value in sa["optimizer"]["state"].items():
        for name, t in value.items():
            assert torch.equal(t, sb["optimizer"]["state"][key][name]), (key, name)
    assert _losses(a) == _losses(b)


def _one_line_error(status: int, err: str, *needles: str) -> None:
    assert status == 2, err
    assert err.count("\n") == 1, err
    assert " error: " in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference run: 20 iterations."""
    run = tmp_path_factory.mktemp("whole") / "run"
    assert main([*RUN, "--out", str(run)]) == 0
    return run


@pytest.fixture
def finished(whole: Path, tmp_path: Path) -> Path:
    """A copy of the reference run to damage."""
    return Path(shutil.copytree(whole, tmp_path / "run"))


# --------------------------------------------------------------------------------------------
# real SIGKILLs at chosen points

# One Python process pays for the imports, then forks a child per job: each child arms its kill
# point (a patched ``os.replace`` or ``write_json`` that SIGKILLs the child), runs ``fmaml`` with
# stdout and stderr to files, and exits; the parent records how each child ended.
_FORKER = """
import json, os, signal, sys, traceback
from pathlib import Path

import torch

import fmaml.app.train as command
from fmaml.app.main import main

torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo once, here
replace, seen = os.replace, []


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point):
    if point == "after-config":  # config.json written, no state.pt: the first seconds of a run
        write_json = command.write_json

        def write_then_die(path, obj):
            write_json(path, obj)
            if Path(path).name == "config.json":
                die()

        command.write_json = write_then_die
    elif point:  # the second save (iteration 10): before state.pt, or between state and params
        target = {"mid-state-save": "state.pt", "between-state-and-params": "params.pt"}[point]

        def replace_or_die(src, dst):
            if Path(dst).name == target:
                seen.append(dst)
                if len(seen) == 2:
                    die()
            return replace(src, dst)

        os.replace = replace_or_die


jobs, children = json.loads(Path(sys.argv[1]).read_text()), {}
for job in jobs:
    pid = os.fork()
    if pid == 0:
        status = 99
        try:
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            arm(job.get("point"))
            status = main(job["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    children[pid] = job["name"]
ended = {}
for _ in children:
    pid, raw = os.wait()
    ended[children[pid]] = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
Path(sys.argv[2]).write_text(json.dumps(ended))
"""


def _jobs(tmp: Path, jobs: dict[str, dict]) -> tuple[Path, Path]:
    """The forker's script and its jobs file; each job's output goes to ``tmp/NAME.out|.err``."""
    script, spec = tmp / "forker.py", tmp / "jobs.json"
    script.write_text(textwrap.dedent(_FORKER))
    for name, job in jobs.items():
        job.update(name=name, stdout=str(tmp / f"{name}.out"), stderr=str(tmp / f"{name}.err"))
    spec.write_text(json.dumps(list(jobs.values())))
    return script, spec


_POINTS = ("after-config", "mid-state-save", "between-state-and-params")


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories of runs SIGKILLed at each point."""
    tmp = tmp_path_factory.mktemp("killed")
    jobs = {p: {"argv": [*RUN, "--out", str(tmp / p)], "point": p} for p in _POINTS}
    script, spec = _jobs(tmp, jobs)
    subprocess.run(
        [sys.executable, str(script), str(spec), str(tmp / "ended.json")],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
        timeout=180,
    )
    ended = json.loads((tmp / "ended.json").read_text())
    for point in _POINTS:
        assert ended[point] == -signal.SIGKILL, (point, (tmp / f"{point}.err").read_text())
    return {point: tmp / point for point in _POINTS}


def test_a_run_killed_in_its_first_seconds_resumes_or_restarts(killed, whole, tmp_path, capsys):
    """Issue 16.1: killed after config.json, before the first state.pt: not wedged."""
    run = killed["after-config"]
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    again = Path(shutil.copytree(run, tmp_path / "again"))
    # the same command again, as a new run in the same directory ...
    status, _, err = _run([*RUN, "--out", str(again)], capsys)
    assert status == 0, err
    _assert_same_run(whole, again)
    # ... or --resume, which starts it from iteration 0: the same run
    status, _, err = _run(_resume(run), capsys)
    assert status == 0, err
    _assert_same_run(whole, run)
    config = json.loads((run / "config.json").read_text())
    assert [h["resumed"] for h in config["history"]] == [False, True]


def test_a_run_killed_mid_save_resumes_and_its_temporary_file_goes(killed, whole, capsys):
    """Issue 16.5: SIGKILL between writing .state.pt.XXXX.tmp and the rename."""
    run = killed["mid-state-save"]
    leftovers = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".state.pt.")
    assert _load(run / "state.pt")["iteration"] == 0  # the previous save, intact
    status, _, err = _run(_resume(run), capsys)
    assert status == 0, err
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    _assert_same_run(whole, run)


def test_after_a_kill_between_saves_the_state_leads(killed, whole, capsys):
    """state.pt is written first: params.pt and metrics.csv can lag; a resume realigns them."""
    run = killed["between-state-and-params"]
    state, params = _load(run / "state.pt"), _load(run / "params.pt")
    assert state["iteration"] == 10
    assert any(not torch.equal(state["params"][n], params[n]) for n in params)  # one save behind
    assert [r["iteration"] for r in _records(run)] == [5, 10]  # the log is not behind the state
    status, _, err = _run(_resume(run, "--iterations", "10"), capsys)  # nothing more to train
    assert status == 0, err
    params = _load(run / "params.pt")
    assert all(torch.equal(state["params"][n], params[n]) for n in params)  # agree again
    status, _, err = _run(_resume(run, "--iterations", "20"), capsys)
    assert status == 0, err
    _assert_same_run(whole, run)


# --------------------------------------------------------------------------------------------
# damaged files: one line, exit 2, what to do; nothing written


def _damage_state(run: Path, how: str) -> None:
    path = run / "state.pt"
    if how == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        state = _load(path)
        if how == "no iteration":
            del state["iteration"]
        elif how == "wrong shape":
            state["params"]["0.weight"] = torch.zeros(3, 1)
        elif how == "bad rng":
            state["python_rng"] = [1, 2]
        elif how == "bad adam":
            state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2)
        torch.save(state, path)


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("garbage", "UnpicklingError"),
        ("truncated", "Error"),
        ("no iteration", "it has no `iteration`"),
        ("wrong shape", "parameter '0.weight' has shape (3, 1), the model's has (40, 1)"),
        ("bad rng", "ValueError"),
        ("bad adam", "Adam's `exp_avg` has shape (2,), not (40, 1)"),
    ],
)
def test_a_damaged_state_is_one_line_and_the_run_restarts(finished, whole, capsys, how, why):
    _damage_state(finished, how)
    before = _snapshot(finished)
    status, _, err = _run(_resume(finished), capsys)
    _one_line_error(status, err, "state.pt is not a state this run can continue from", why)
    assert f"remove {finished}/state.pt and run fmaml train sinusoid --resume {finished}" in err
    assert _snapshot(finished) == before  # config.json not rewritten, nothing else either
    # what it says to do works: the run starts again from iteration 0, the same run
    (finished / "state.pt").unlink()
    status, _, err = _run(_resume(finished), capsys)
    assert status == 0, err
    _assert_same_run(whole, finished)


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("[1, 2]", ["it holds a JSON array, not an object of options"]),
        ({"log_every": 0}, ["`log_every` is 0: must be an integer >= 1"]),
        ({"checkpoint": "bogus"}, ["`checkpoint` is 'bogus': unknown policy"]),
        ({"meta_lr": "fast"}, ["`meta_lr` is 'fast'; it must be a number"]),
        ({"seed": None}, ["`seed` is None; it must be a number"]),
        ({"task": 5}, ["`task` is 5, not one of"]),
        (b"\xff\xfe\x00garbage", ["cannot read config.json"]),
        ("{", ["cannot read config.json"]),
    ],
)
def test_a_damaged_config_is_one_line(finished, capsys, content, needles):
    path = finished / "config.json"
    if isinstance(content, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **content}))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = _snapshot(finished)
    status, _, err = _run(_resume(finished), capsys)
    _one_line_error(status, err, f"--resume {finished}", *needles)
    assert "start a new run with --out NEW" in err
    assert _snapshot(finished) == before


def test_a_config_without_a_trajectory_option_is_refused(finished, capsys):
    path = finished / "config.json"
    config = json.loads(path.read_text())
    del config["inner_lr"]
    path.write_text(json.dumps(config))
    status, _, err = _run(_resume(finished), capsys)
    _one_line_error(status, err, "`inner_lr` is missing")


@pytest.fixture(scope="module")
def whole30(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("whole30") / "run"
    assert main([*RUN[:-1], "30", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("bad", [b"42", b"\xff\xfe binary \x00", b'{"iteration": "x"}'])
def test_an_unreadable_metrics_line_is_recovered_from_the_csv(finished, whole30, capsys, bad):
    """Issue 16.3: a garbled line no longer drops the records after it."""
    lines = (finished / "metrics.jsonl").read_bytes().splitlines()
    lines[1] = bad  # the record of iteration 10
    (finished / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    status, _, err = _run(_resume(finished, "--iterations", "30"), capsys)
    assert status == 0
    assert err.count("\n") == 1 and "warning: metrics.jsonl: 1 unreadable line(s) (line 2)" in err
    assert "the records of iteration 10 recovered from metrics.csv" in err
    assert [i for i, _ in _losses(finished)] == [5, 10, 15, 20, 25, 30]
    assert _losses(finished) == _losses(whole30)  # the CSV keeps every digit
    assert (finished / "metrics.jsonl.damaged").read_bytes() == bad + b"\n"


def test_records_in_neither_log_are_reported_not_skipped(finished, capsys):
    lines = (finished / "metrics.jsonl").read_text().splitlines()
    del lines[1]  # iteration 10 ...
    (finished / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    csv = (finished / "metrics.csv").read_text().splitlines()
    (finished / "metrics.csv").write_text("\n".join(csv[:2] + csv[3:]) + "\n")  # ... in neither
    status, _, err = _run(_resume(finished, "--iterations", "25"), capsys)
    assert status == 0
    assert (
        "warning: the records of iteration 10 are in neither metrics.jsonl nor metrics.csv" in err
    )
    assert [i for i, _ in _losses(finished)] == [5, 15, 20, 25]


def test_a_torn_last_line_is_redone_silently(whole, tmp_path, capsys):
    """What a SIGKILL mid-append leaves: a record after the last save, redone exactly."""
    half = tmp_path / "half"
    assert main([*RUN[:-1], "10", "--out", str(half)]) == 0
    with (half / "metrics.jsonl").open("ab") as log:
        log.write(b'{"iteration": 15, "meta_l')
    status, _, err = _run(_resume(half, "--iterations", "20"), capsys)
    assert status == 0 and err == ""
    _assert_same_run(whole, half)
    assert not (half / "metrics.jsonl.damaged").exists()


def test_leftover_temporary_files_are_removed(finished, capsys):
    for name in (".state.pt.abc123_x.tmp", ".params.pt.zz9.tmp", ".training_curve.png.q.tmp"):
        (finished / name).write_bytes(b"partial")
    (finished / ".mine.tmp").write_text("not fmaml's")
    status, _, err = _run(_resume(finished), capsys)
    assert status == 0, err
    assert sorted(p.name for p in finished.iterdir() if p.name.startswith(".")) == [".mine.tmp"]


# --------------------------------------------------------------------------------------------
# read-only and full file systems


def test_a_read_only_run_directory_is_one_line(finished, capsys, monkeypatch):
    """Simulated with a failing probe where the tests run as root (which ignores chmod)."""
    before = _snapshot(finished)
    if os.geteuid() == 0:

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(rundir.tempfile, "mkstemp", read_only)
    else:
        finished.chmod(0o555)
    try:
        status, _, err = _run(_resume(finished, "--eval-steps", "0,2"), capsys)
    finally:
        finished.chmod(0o755)
    _one_line_error(status, err, f"cannot write in {finished}", "cp -r", "--resume NEW")
    assert _snapshot(finished) == before


def _enospc(path: Path) -> WriteError:
    return WriteError(path, OSError(errno.ENOSPC, "No space left on device"))


def test_a_full_disk_while_writing_the_figures(finished, capsys, monkeypatch):
    """Issue 16.2: the results are printed, the error says how to write them."""

    def full(path, records, title):
        raise _enospc(path)

    monkeypatch.setattr(train_command, "plot_training_curve", full)
    status, out, err = _run(_resume(finished, "--eval-steps", "0,2"), capsys)
    _one_line_error(status, err, "cannot write", "training_curve.png: No space left on device")
    assert "results above are not all saved" in err
    assert f"fmaml train sinusoid --resume {finished}" in err
    assert "  2 steps:" in out and "trained 20 iterations" in out  # printed before the writes
    monkeypatch.undo()
    status, out, _ = _run(_resume(finished, "--eval-steps", "0,2"), capsys)
    assert status == 0 and "  2 steps:" in out


def test_a_full_disk_when_the_config_is_written(finished, capsys, monkeypatch):
    before = _snapshot(finished)

    def full(path, obj):
        raise _enospc(path)

    monkeypatch.setattr(train_command, "write_json", full)
    status, _, err = _run(_resume(finished, "--iterations", "30"), capsys)
    _one_line_error(status, err, "config.json: No space left on device", "same command again")
    assert _snapshot(finished) == before


def _can_unshare() -> bool:
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


_NAMESPACE = """
set -eu
mnt=$1; run=$2; shift 2
mount -t tmpfs -o size=2m tmpfs "$mnt" || exit 77
mkdir "$mnt/full" "$mnt/ro"
cp -r "$run" "$mnt/full/run"
cp -r "$run" "$mnt/ro/run"
mount --bind "$mnt/ro" "$mnt/ro" && mount -o remount,bind,ro "$mnt/ro" || exit 77
dd if=/dev/zero of="$mnt/filler" bs=4k 2>/dev/null || true
"$@"
cp -r "$mnt/full/run" "$mnt/../full-run"
cp -r "$mnt/ro/run" "$mnt/../ro-run"
"""


@pytest.mark.skipif(not _can_unshare(), reason="cannot make a private mount namespace here")
def test_a_real_full_and_a_real_read_only_file_system(whole, tmp_path, capsys):
    """A 2 MiB tmpfs filled up, and a read-only bind mount, in a private mount namespace."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["--eval-steps", "0,2"]
    jobs = {name: {"argv": _resume(mnt / name / "run", *args)} for name in ("full", "ro")}
    script, spec = _jobs(tmp_path, jobs)
    (tmp_path / "ns.sh").write_text(_NAMESPACE)
    command = ["unshare", "--mount", "--propagation", "private", "bash", str(tmp_path / "ns.sh")]
    forker = [sys.executable, str(script), str(spec), str(tmp_path / "ended.json")]
    result = subprocess.run(
        [*command, str(mnt), str(whole), *forker],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if result.returncode == 77:
        pytest.skip(f"cannot mount here: {result.stderr}")
    assert result.returncode == 0, result.stderr
    ended = json.loads((tmp_path / "ended.json").read_text())
    reference = _snapshot(whole)
    for name, needles in (
        ("full", ["config.json: No space left on device", "same command again"]),
        ("ro", ["cannot write in", "Read-only file system", "cp -r"]),
    ):
        _one_line_error(ended[name], (tmp_path / f"{name}.err").read_text(), *needles)
        assert _snapshot(tmp_path / f"{name}-run") == reference, name  # left as it was
    # and it is still a run: on a disk with space, the same command completes
    status, output, err = _run(_resume(tmp_path / "full-run", *args), capsys)
    assert status == 0 and "  2 steps:" in output, err


# --------------------------------------------------------------------------------------------
# interruptions outside the training loop, a second process, a diverging run


def test_ctrl_c_during_start_up_writes_nothing(tmp_path, capsys, monkeypatch):
    def interrupted(self, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(SinusoidJob, "__init__", interrupted)
    status, _, err = _run([*RUN, "--out", str(tmp_path / "run")], capsys)
    assert status == 130
    assert err == (
        "fmaml train sinusoid: interrupted by SIGINT before the run started; nothing was written\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_evaluation(finished, capsys, monkeypatch, signum, status):
    def interrupted(self, model, params):
        signal.raise_signal(signum)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("not interrupted")

    monkeypatch.setattr(SinusoidJob, "evaluate", interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    code, _, err = _run(_resume(finished, "--eval-steps", "0,2"), capsys)
    name = signal.Signals(signum).name
    assert code == status
    assert err == (
        f"fmaml train sinusoid: interrupted by {name} during the evaluation; the training is "
        f"saved. Evaluate again with: fmaml train sinusoid --resume {finished}\n"
    )
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    monkeypatch.undo()
    code, out, _ = _run(_resume(finished, "--eval-steps", "0,2"), capsys)
    assert code == 0 and "  2 steps:" in out


def test_a_second_process_on_the_same_run_directory_is_refused(finished, capsys):
    before = _snapshot(finished)
    with rundir.locked(finished):
        status, _, err = _run(_resume(finished), capsys)
    _one_line_error(status, err, f"another fmaml train is running in {finished}", "wait for it")
    assert _snapshot(finished) == before
    assert _run(_resume(finished), capsys)[0] == 0  # the lock went with its holder


def test_a_diverging_run_names_the_task_and_the_inner_step(tmp_path, capsys):
    argv = [*RUN, "--inner-lr", "100", "--inner-steps", "3", "--out", str(tmp_path / "run")]
    status, _, err = _run(argv, capsys)
    assert status == 1 and err.count("\n") == 1
    assert "the meta-loss is nan at iteration 1: task 0 of 25: the support loss is inf " in err
    assert "before inner step 3" in err and "Lower --meta-lr or --inner-lr" in err
    assert f"{tmp_path / 'run'}/state.pt, iteration 0" in err
    assert _load(tmp_path / "run" / "state.pt")["iteration"] == 0  # resumable, if pointless


@pytest.mark.skipif(
    not (OMNIGLOT / "images_background_small2.zip").is_file(), reason="no Omniglot data"
)
def test_an_empty_zip_beside_a_good_one_is_refused(tmp_path, capsys):
    """Issue 16.4: it used to train on the other zip's 156 characters without a word."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "images_background_small2.zip").symlink_to(OMNIGLOT / "images_background_small2.zip")
    import zipfile

    zipfile.ZipFile(data / "images_background_small1.zip", "w").close()
    argv = ["train", "omniglot", "--data-dir", str(data), "--out", str(tmp_path / "run")]
    status, _, err = _run(argv, capsys)
    _one_line_error(status, err, "images_background_small1.zip holds no character images")
    assert not (tmp_path / "run").exists()
