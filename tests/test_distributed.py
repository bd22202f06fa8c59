"""``fmaml.distributed``: data-parallel meta-gradients over ``torch.distributed`` (CPU, gloo).

Everything multi-process runs on the CPU with gloo over loopback (``MASTER_ADDR=127.0.0.1`` and a
free port found by binding port 0). Starting a process costs a torch import (2-4 s here), so the
processes are reused: one group of two ranks runs every numerical and consistency check in turn
(``_CHECKS``; each check's collectives are the same on both ranks, its assertions come after) and
writes what each rank saw to a JSON file; one test per check reads it. Three more groups fail on
purpose: a rank that raises under ``fail_together``, a rank that hangs (the timeout), and a real
``torchrun`` whose rank 1 raises. The four groups start at once (the ``groups`` fixture) and must
all end within ``GROUP_LIMIT_S``. The single-process behaviour (no process group) and the pure
helpers (``shard_bounds``, the bucket plan) are tested in-process.

Tolerances: float64 meta-gradients agree with the single-process ``MAML.meta_grad`` to 1e-12
(they differ only in the order of the sum over tasks); float32 to rtol 1e-5 / atol 1e-6. The
bucketed all-reduce equals a per-tensor all-reduce bit for bit (two ranks: ``a + b`` either way).
NCCL is not tested (no GPU here).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import optree
import pytest
import torch
import torch.multiprocessing as mp
from _models import (
    F64,
    LR,
    conv_net,
    image_tasks,
    mlp,
    mse,
    regression_tasks,
    single_thread,  # noqa: F401 (autouse fixture)
    xent,
)
from conftest import assert_trees_close
from hypothesis import given
from hypothesis import strategies as st

import fmaml
from fmaml import distributed
from fmaml.distributed import Context

WORLD = 2
#: Every multi-process group must end within this. All four together take 25-45 s here (2 cores
#: shared with other jobs; mostly torch imports). The fault tests also bound the time between
#: the failure and the other rank's exit, which is what matters: under 10 s, and 2 s timeouts.
GROUP_LIMIT_S = 90.0
_REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# launching groups of processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, out: str, scenario: str, timeout_s: float) -> None:
    """The body of one spawned rank: set torchrun's variables, run ``scenario``, record."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    record: dict[str, object] = {"rank": rank}
    try:
        _SCENARIOS[scenario](rank, timeout_s, record)
    except BaseException as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        record["failed_at"] = time.time()
        raise
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))


class _Group:
    """``WORLD`` spawned ranks running ``scenario``; :meth:`finish` joins them and reads the
    records (``wait_for``: join only that rank, then kill the others, as torchrun would)."""

    def __init__(self, scenario: str, tmp: Path, timeout_s: float = 30.0) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.tmp = tmp
        self.procs = [
            ctx.Process(target=_entry, args=(r, port, str(tmp), scenario, timeout_s))
            for r in range(WORLD)
        ]
        self.start = time.monotonic()
        for p in self.procs:
            p.start()

    def finish(self, wait_for: int | None = None):
        """``(exit codes, records by rank, seconds from start to the end of the join)``."""
        try:
            for r, p in enumerate(self.procs):
                if wait_for is None or r == wait_for:
                    p.join(max(0.0, GROUP_LIMIT_S - (time.monotonic() - self.start)))
            elapsed = time.monotonic() - self.start
        finally:
            for p in self.procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        records = {}
        for r in range(WORLD):
            path = self.tmp / f"rank{r}.json"
            records[r] = json.loads(path.read_text()) if path.exists() else {}
        return [p.exitcode for p in self.procs], records, elapsed


# --------------------------------------------------------------------------------------------
# the checks, run by every rank of one group in this order


def _maml(model: torch.nn.Module, loss_fn: Callable = mse, **kwargs) -> fmaml.MAML:
    return fmaml.MAML(model, loss_fn, inner_lr=LR, **kwargs)


def _meta_grad_case(n_tasks: int, dtype: torch.dtype, **maml_kwargs):
    def check(rank: int) -> Callable[[], None]:
        model = mlp(seed=0).to(dtype)
        maml = _maml(model, **maml_kwargs)
        params = fmaml.params(model)
        tasks = optree.tree_map(
            lambda x: x.to(dtype), regression_tasks(torch.Generator().manual_seed(7), n_tasks)
        )
        loss, grads = distributed.distributed_meta_grad(
            maml, params, tasks, 3, Context(rank, WORLD, rank, torch.device("cpu"), "gloo")
        )
        distributed.check_in_sync(grads)  # identical on every rank, bit for bit
        ref_loss, ref_grads = maml.meta_grad(params, tasks, 3)

        def verify() -> None:
            tol = 1e-12 if dtype == F64 else 1e-5
            assert_trees_close((loss, grads), (ref_loss, ref_grads), rtol=tol, atol=tol / 10)

        return verify

    return check


def _conv_loop_case(rank: int) -> Callable[[], None]:
    model = conv_net(seed=1)
    maml = _maml(model, xent, batching="loop", checkpoint=fmaml.Binomial(1))
    params = fmaml.params(model)
    tasks = image_tasks(torch.Generator().manual_seed(3), n_tasks=5)
    loss, grads = distributed.distributed_meta_grad(maml, params, tasks, 4)  # ctx from the group
    ref = maml.meta_grad(params, tasks, 4)
    return lambda: assert_trees_close((loss, grads), ref)


def _backward_route(rank: int) -> Callable[[], None]:
    model = mlp(seed=2)
    maml = _maml(model)
    tasks = regression_tasks(torch.Generator().manual_seed(5), n_tasks=7)
    _, ref_grads = maml.meta_grad(fmaml.params(model), tasks, 2)
    local = distributed.shard(tasks, rank, WORLD)
    n_local = distributed.shard_bounds(7, rank, WORLD)
    maml.unrolled_loss(dict(model.named_parameters()), local, 2).backward()
    distributed.all_reduce_module_grads(model, weight=n_local[1] - n_local[0], bucket_bytes=64)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return lambda: assert_trees_close(grads, ref_grads)


def _mixed_grads(rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return {
        "a": torch.randn(3, 4, generator=gen),
        "b": torch.randn(5, generator=gen, dtype=F64),
        "c": torch.randn(2, 3, generator=gen).half(),
        "d": torch.randn(17, generator=gen),
        "e": torch.randn(4, 1, generator=gen, dtype=F64).t(),  # not contiguous
        "f": torch.randn((), generator=gen).bfloat16(),
    }


def _bucketed_equals_per_tensor(rank: int) -> Callable[[], None]:
    grads = _mixed_grads(rank)
    tiny = distributed.all_reduce_mean(grads, bucket_bytes=16)
    default = distributed.all_reduce_mean(grads)
    plain = {}
    for name, g in grads.items():
        g = g.clone()
        torch.distributed.all_reduce(g)
        plain[name] = g / WORLD
    n_tiny = len(list(distributed._fill_buckets(list(grads.values()), 16)))
    n_default = len(list(distributed._fill_buckets(list(grads.values()), distributed.BUCKET_BYTES)))

    def verify() -> None:
        assert (n_tiny, n_default) == (len(grads), 4)  # one a tensor; one a dtype
        for out in (tiny, default):
            assert list(out) == list(grads)
            for name in grads:
                assert out[name].dtype == grads[name].dtype
                assert out[name].shape == grads[name].shape
                assert torch.equal(out[name], plain[name]), name

    return verify


def _weighted_mean(rank: int) -> Callable[[], None]:
    grads = _mixed_grads(rank)
    grads = {n: g for n, g in grads.items() if g.dtype in (torch.float32, F64)}
    out = distributed.all_reduce_mean(grads, weight=rank + 1, bucket_bytes=32)
    everyone = [_mixed_grads(r) for r in range(WORLD)]
    expected = {
        n: sum((r + 1) * everyone[r][n] for r in range(WORLD)) / sum(range(1, WORLD + 1))
        for n in grads
    }
    return lambda: assert_trees_close(out, expected, rtol=1e-6, atol=1e-7)


def _zero_weight_ignores_nan(rank: int) -> Callable[[], None]:
    grads = {"w": torch.full((3,), float("nan")) if rank == 1 else torch.arange(3.0)}
    out = distributed.all_reduce_mean(grads, weight=0 if rank == 1 else 2)
    return lambda: assert_trees_close(out, {"w": torch.arange(3.0)})


def _all_zero_weights(rank: int) -> Callable[[], None]:
    with pytest.raises(ValueError, match="add up to 0"):
        distributed.all_reduce_mean({"w": torch.ones(2)}, weight=0)
    return lambda: None


def _broadcast_dict(rank: int) -> Callable[[], None]:
    params = fmaml.params(mlp(seed=10 + rank))
    ids = {n: id(p) for n, p in params.items()}
    expected = fmaml.params(mlp(seed=10))
    distributed.broadcast_params(params, bucket_bytes=48)
    distributed.check_in_sync(params)

    def verify() -> None:
        assert {n: id(p) for n, p in params.items()} == ids  # in place
        for name in expected:
            assert torch.equal(params[name], expected[name]), name

    return verify


def _broadcast_module(rank: int) -> Callable[[], None]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    torch.nn.init.normal_(model[0].weight, generator=torch.Generator().manual_seed(rank))
    model[1].running_mean.fill_(rank)
    model[1].num_batches_tracked.fill_(rank + 5)  # an int64 buffer
    distributed.broadcast_params(model, src=1)
    distributed.check_in_sync(model)

    def verify() -> None:
        assert torch.equal(model[1].running_mean, torch.ones(4))
        assert int(model[1].num_batches_tracked) == 6
        expected = torch.nn.init.normal_(
            torch.empty(4, 3), generator=torch.Generator().manual_seed(1)
        )
        assert torch.equal(model[0].weight, expected)

    return verify


def _in_sync_detects_drift(rank: int) -> Callable[[], None]:
    params = fmaml.params(mlp(seed=0))
    if rank == 1:
        params["2.bias"] += 1e-9
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] differ.*rank 1 first at '2.bias'"):
        distributed.check_in_sync(params)
    distributed.check_in_sync(params, atol=1e-6)  # within tolerance
    return lambda: None


def _in_sync_detects_layout(rank: int) -> Callable[[], None]:
    params = fmaml.params(mlp(seed=0))
    if rank == 1:
        params["extra"] = torch.zeros(2)
        params["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match=r"rank 1: unexpected \['extra'\].*'0.weight' \(5, 3\)"):
        distributed.check_in_sync(params)
    return lambda: None


def _same_config(rank: int) -> Callable[[], None]:
    distributed.check_same_config(
        {"k": 5, "policy": fmaml.Binomial(2), "inner_lr": 0.4, "meta_batch": 16, "seed": 0}
    )
    return lambda: None


def _different_config(rank: int) -> Callable[[], None]:
    config = {"k": 5 if rank == 0 else 3, "policy": "auto" if rank == 0 else "binomial"}
    config.update({"seed": 0, "meta_batch": 16})
    if rank == 1:
        config["only_on_rank_1"] = True
    pattern = (
        r"differing keys: 'k' \(rank 0: 5, rank 1: 3\); 'only_on_rank_1' \(rank 0: <missing>, "
        r"rank 1: true\); 'policy' \(rank 0: \"auto\", rank 1: \"binomial\"\)\. Launch"
    )
    with pytest.raises(ValueError, match=pattern):
        distributed.check_same_config(config)
    return lambda: None


def _different_meta_batches(rank: int) -> Callable[[], None]:
    model = mlp(seed=0)
    tasks = regression_tasks(torch.Generator().manual_seed(1), n_tasks=8 if rank == 0 else 6)
    with pytest.raises(RuntimeError, match=r"different meta-batches: rank .* add up to 7"):
        distributed.distributed_meta_grad(_maml(model), fmaml.params(model), tasks, 1)
    return lambda: None


def _any_rank(rank: int) -> Callable[[], None]:
    one = distributed.any_rank(rank == 1)
    none = distributed.any_rank(False)
    every = distributed.any_rank(torch.tensor(True))
    return lambda: None if (one, none, every) == (True, False, True) else pytest.fail(str(one))


def _gather_shards(rank: int) -> Callable[[], None]:
    results = {}
    for n, trailing, dtype in ((7, (), F64), (1, (2, 3), torch.int64), (4, (5,), torch.float32)):
        full = torch.arange(n * math.prod(trailing)).reshape(n, *trailing).to(dtype)
        start, stop = distributed.shard_bounds(n, rank, WORLD)
        results[n] = (distributed.gather_shards(full[start:stop], n), full)

    def verify() -> None:
        for gathered, full in results.values():
            assert gathered.dtype == full.dtype
            assert torch.equal(gathered, full)

    return verify


def _context(rank: int) -> Callable[[], None]:
    ctx = distributed.setup()  # already initialised: the same group comes back
    return lambda: (
        None
        if ctx == Context(rank, WORLD, rank, torch.device("cpu"), "gloo")
        else pytest.fail(f"{ctx}")
    )


_CHECKS: dict[str, Callable[[int], Callable[[], None]]] = {
    "context": _context,
    "meta_grad_f64_T8": _meta_grad_case(8, F64),
    "meta_grad_f64_T7_uneven": _meta_grad_case(7, F64),
    "meta_grad_f64_T1_empty_rank": _meta_grad_case(1, F64),
    "meta_grad_f64_chunked_binomial": _meta_grad_case(7, F64, task_chunk=2, checkpoint="binomial"),
    "meta_grad_f32_T8": _meta_grad_case(8, torch.float32),
    "meta_grad_f32_T7_uneven": _meta_grad_case(7, torch.float32),
    "meta_grad_conv_loop": _conv_loop_case,
    "backward_route": _backward_route,
    "bucketed_equals_per_tensor": _bucketed_equals_per_tensor,
    "weighted_mean": _weighted_mean,
    "zero_weight_ignores_nan": _zero_weight_ignores_nan,
    "all_zero_weights": _all_zero_weights,
    "broadcast_dict": _broadcast_dict,
    "broadcast_module": _broadcast_module,
    "in_sync_detects_drift": _in_sync_detects_drift,
    "in_sync_detects_layout": _in_sync_detects_layout,
    "same_config": _same_config,
    "different_config": _different_config,
    "different_meta_batches": _different_meta_batches,
    "any_rank": _any_rank,
    "gather_shards": _gather_shards,
}


def _threads() -> int | None:
    """This process's thread count (Linux), to see the process group's threads go."""
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None


def _run_checks(rank: int, timeout_s: float, record: dict[str, object]) -> None:
    record["threads_before"] = _threads()
    with distributed.setup(timeout_s=timeout_s) as ctx:
        assert ctx.world_size == WORLD
        record["threads_during"] = _threads()
        for name, check in _CHECKS.items():
            start = time.perf_counter()
            try:
                verify = check(rank)
            except Exception:
                # a check whose collectives failed may leave the ranks out of step: stop here
                record[name] = traceback.format_exc()
                raise
            try:
                verify()
                record[name] = "ok"
            except Exception:
                record[name] = traceback.format_exc()
            record[f"{name} seconds"] = round(time.perf_counter() - start, 3)
    record["threads_after"] = _threads()


# --------------------------------------------------------------------------------------------
# the failing groups


def _rank1_raises(rank: int, timeout_s: float, record: dict[str, object]) -> None:
    grads = {"w": torch.ones(1000), "b": torch.ones(3, dtype=F64)}
    with distributed.setup(timeout_s=timeout_s):
        distributed.all_reduce_mean(grads)
        record["step_1"] = "ok"
        if rank == 1:
            record["raised_at"] = time.time()
            raise ValueError("boom in the data loader")
        for _ in range(10**6):  # rank 0 carries on into its next collectives
            distributed.all_reduce_mean(grads)


def _rank1_hangs(rank: int, timeout_s: float, record: dict[str, object]) -> None:
    with distributed.setup(timeout_s=timeout_s):
        distributed.all_reduce_mean({"w": torch.ones(3)})
        record["step_1"] = "ok"
        if rank == 1:
            time.sleep(GROUP_LIMIT_S)  # alive but stuck: only the timeout can free rank 0
        record["entered"] = time.time()
        distributed.all_reduce_mean({"w": torch.ones(3)})


_SCENARIOS = {"checks": _run_checks, "rank1_raises": _rank1_raises, "rank1_hangs": _rank1_hangs}


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> dict[str, object]:
    """Start every multi-process group at once (they mostly wait on each other), then join.

    On this 2-core machine shared with other jobs a group takes 5-15 s, mostly torch imports;
    overlapping the four keeps the file under a minute.
    """
    tmp = tmp_path_factory.mktemp("groups")
    script = tmp / "train.py"
    script.write_text(textwrap.dedent(_TORCHRUN_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
    ]
    start = time.monotonic()
    torchrun = subprocess.Popen(
        command, env=env, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    started = {
        "checks": _Group("checks", _mkdir(tmp / "checks")),
        "raises": _Group("rank1_raises", _mkdir(tmp / "raises"), timeout_s=30),
        "hangs": _Group("rank1_hangs", _mkdir(tmp / "hangs"), timeout_s=2),
    }
    try:
        results: dict[str, object] = {
            "checks": started["checks"].finish(),
            "raises": started["raises"].finish(),
            "hangs": started["hangs"].finish(wait_for=0),
        }
        try:
            output, _ = torchrun.communicate(timeout=GROUP_LIMIT_S - (time.monotonic() - start))
        except subprocess.TimeoutExpired:
            torchrun.kill()
            output, _ = torchrun.communicate()
        results["torchrun"] = (torchrun.returncode, output, time.monotonic() - start)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()
    return results


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def checks(groups) -> dict[int, dict[str, object]]:
    codes, records, elapsed = groups["checks"]
    assert elapsed < GROUP_LIMIT_S
    for r in range(WORLD):
        assert codes[r] == 0, f"rank {r} exited with {codes[r]}: {records[r].get('traceback')}"
    return records


def test_teardown_releases_the_process_group(checks):
    # After the torch.func calls, the gloo group (and its threads) must not outlive teardown:
    # if it does, the interpreter aborts at exit (see fmaml.distributed._import_dynamo).
    for r in range(WORLD):
        if checks[r]["threads_before"] is None:
            pytest.skip("no /proc/self/task to count threads")
        assert checks[r]["threads_during"] > checks[r]["threads_before"]
        assert checks[r]["threads_after"] == checks[r]["threads_before"], checks[r]


@pytest.mark.parametrize("name", list(_CHECKS))
def test_two_ranks(checks, name):
    for r in range(WORLD):
        assert checks[r].get(name) == "ok", f"rank {r}, check {name}:\n{checks[r].get(name)}"


def test_a_rank_that_raises_stops_every_rank(groups):
    codes, records, elapsed = groups["raises"]
    assert elapsed < GROUP_LIMIT_S
    assert codes == [1, 1], records
    assert records[1]["error"] == "ValueError: boom in the data loader"
    assert records[0]["error"] == (
        "RuntimeError: fmaml.distributed: rank 0 of 2 stopped because rank 1 failed: "
        "ValueError: boom in the data loader"
    )
    # rank 0 stopped at once (the abort closed the connections), not after the 30 s timeout
    assert records[0]["failed_at"] - records[1]["raised_at"] < 10


def test_a_stuck_rank_times_out_the_others(groups):
    codes, records, elapsed = groups["hangs"]
    assert elapsed < GROUP_LIMIT_S
    assert codes[0] == 1, records
    # gloo words it "Timed out waiting 2000ms for recv ..." or "Application timeout caused ..."
    assert re.search("timed out|timeout", records[0]["error"], re.I), records[0]["error"]
    assert 1.5 < records[0]["failed_at"] - records[0]["entered"] < 20


_TORCHRUN_SCRIPT = """
    import torch, fmaml
    from fmaml import distributed

    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    maml = fmaml.MAML(model, torch.nn.functional.mse_loss, inner_lr=0.1)
    params = fmaml.params(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 1, generator=gen)
    tasks = fmaml.Tasks((x, x.sin()), (x, x.cos()))
    with distributed.setup(timeout_s=30) as ctx:
        distributed.check_same_config({"k": 3, "meta_batch": 6})
        distributed.broadcast_params(params)
        loss, grads = distributed.distributed_meta_grad(maml, params, tasks, 3, ctx)
        ref_loss, ref_grads = maml.meta_grad(params, tasks, 3)
        ok = all(torch.allclose(grads[n], ref_grads[n], atol=1e-6) for n in grads)
        print(f"rank {ctx.rank}/{ctx.world_size} local_rank {ctx.local_rank} {ctx.backend} "
              f"meta-grad equal: {ok}", flush=True)
        if ctx.rank == 1:
            raise ValueError("boom on purpose")
        for _ in range(100):
            distributed.distributed_meta_grad(maml, params, tasks, 3, ctx)
"""


def test_torchrun_rank_failure_ends_the_job(groups):
    returncode, output, elapsed = groups["torchrun"]
    assert returncode != 0, output
    assert elapsed < GROUP_LIMIT_S
    for r in range(WORLD):
        assert f"rank {r}/2 local_rank {r} gloo meta-grad equal: True" in output, output
    assert "ValueError: boom on purpose" in output, output
    assert "rank 1 of 2 stopping (ValueError: boom on purpose)" in output, output
    # torchrun's summary names the first failure by rank
    assert re.search(r"Root Cause \(first observed failure\):.*?rank\s*: 1\b", output, re.S), output


# --------------------------------------------------------------------------------------------
# one process: no process group, everything is a no-op or a plain call


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_setup_without_torchrun_is_one_process(no_torchrun):
    ctx = distributed.setup(device="cpu")
    assert ctx == Context()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    distributed.teardown()  # nothing to tear down
    with pytest.raises(KeyError), ctx:  # as a context manager it only re-raises
        raise KeyError("x")


def test_single_process_functions_are_plain_calls(no_torchrun, gen):
    model = mlp(seed=0)
    maml, params = _maml(model), fmaml.params(model)
    tasks = regression_tasks(gen, n_tasks=3)
    expected = maml.meta_grad(params, tasks, 2)
    assert_trees_close(distributed.distributed_meta_grad(maml, params, tasks, 2), expected)
    assert_trees_close(
        distributed.distributed_meta_grad(maml, params, tasks, 2, Context()), expected
    )
    grads = expected[1]
    out = distributed.all_reduce_mean(grads, weight=3)
    assert list(out) == list(grads) and all(out[n] is grads[n] for n in grads)
    assert distributed.broadcast_params(params) is params
    distributed.check_in_sync(params)
    distributed.check_same_config({"k": 2})
    assert distributed.any_rank(True) and not distributed.any_rank(0)
    x = torch.arange(3.0)
    assert distributed.gather_shards(x, 3) is x
    with pytest.raises(ValueError, match="nothing to average"):
        distributed.all_reduce_mean(grads, weight=0)
    with pytest.raises(ZeroDivisionError), distributed.fail_together():
        raise ZeroDivisionError


@given(n=st.integers(0, 200), world=st.integers(1, 17))
def test_shard_bounds_partition(n, world):
    bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@given(n=st.integers(1, 9), world=st.integers(1, 4))
def test_shard_concatenates_to_the_meta_batch(n, world):
    gen = torch.Generator().manual_seed(n)
    tasks = fmaml.Tasks(
        support={"x": torch.randn(n, 2, 3, generator=gen), "y": torch.randn(n, 2, generator=gen)},
        query=(torch.randn(n, 4, generator=gen),),
    )
    shards = [distributed.shard(tasks, r, world) for r in range(world)]
    assert all(isinstance(s, fmaml.Tasks) for s in shards)
    joined = optree.tree_map(lambda *xs: torch.cat(xs), *shards)
    assert_trees_close(joined, tasks, rtol=0, atol=0)
    first = shards[0].support["x"]
    assert first.numel() == 0 or first.data_ptr() == tasks.support["x"].data_ptr()  # views


def test_bucket_plan():
    f32, f64 = torch.float32, F64
    tensors = [
        torch.zeros(10, dtype=f32),  # 40 B
        torch.zeros(3, dtype=f64),  # 24 B
        torch.zeros(100, dtype=f32),  # 400 B: larger than a bucket, alone
        torch.zeros(2, dtype=f32),  # 8 B
        torch.zeros(5, dtype=f64),  # 40 B: 24 + 40 > 48 closes the float64 bucket
    ]
    assert list(distributed._fill_buckets(tensors, 48)) == [[0], [2], [1], [3], [4]]
    assert list(distributed._fill_buckets(tensors, 10**6)) == [[0, 2, 3], [1, 4]]
    assert list(distributed._fill_buckets([], 10)) == []


# --------------------------------------------------------------------------------------------
# errors


def _set_env(monkeypatch, **values):
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE is set but MASTER_ADDR, MASTER_PORT are"),
        (
            {"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            r"RANK=2 is not in \[0, WORLD_SIZE=2\)",
        ),
        (
            {"WORLD_SIZE": "two", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            "WORLD_SIZE must be an int, got 'two'",
        ),
    ],
)
def test_setup_rejects_a_bad_environment(no_torchrun, monkeypatch, env, match):
    _set_env(monkeypatch, **env)
    with pytest.raises(RuntimeError, match=match):
        distributed.setup()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_setup_nccl_without_cuda(no_torchrun, monkeypatch):
    _set_env(monkeypatch, WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    with pytest.raises(RuntimeError, match=r"backend 'nccl' needs CUDA.*use backend='gloo'"):
        distributed.setup("nccl")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: distributed.setup(timeout_s=0), ValueError, "`timeout_s` must be positive"),
        (lambda: distributed.setup(timeout_s="1"), TypeError, "`timeout_s` must be a number"),
        (lambda: distributed.setup(backend=1), TypeError, "`backend` must be None"),
        (
            lambda: distributed.shard_bounds(4, 2, 2),
            ValueError,
            r"`rank` must be in \[0, world_size=2\), got 2",
        ),
        (lambda: distributed.shard_bounds(4, 0, 0), ValueError, "`world_size` must be >= 1"),
        (lambda: distributed.shard_bounds(4.0, 0, 1), TypeError, "`n` must be an int"),
        (lambda: distributed.shard((1, 2), 0, 1), TypeError, "`tasks` must be fmaml.Tasks"),
        (
            lambda: distributed.shard(fmaml.Tasks(torch.zeros(3, 1), torch.zeros(2, 1)), 0, 1),
            ValueError,
            r"same leading task dimension, got sizes \[2, 3\]",
        ),
        (
            lambda: distributed.shard(fmaml.Tasks(torch.zeros(3, 1), 5), 0, 1),
            ValueError,
            "must be a tensor with a leading task dimension, got int",
        ),
        (lambda: distributed.all_reduce_mean([1]), TypeError, "`grads` must be a dict"),
        (
            lambda: distributed.all_reduce_mean({"w": torch.ones(2, dtype=torch.int64)}),
            TypeError,
            r"grads\['w'\] must be a floating-point tensor, got int64\[2\]",
        ),
        (
            lambda: distributed.all_reduce_mean({"w": torch.ones(2).to_sparse()}),
            TypeError,
            "only dense tensors",
        ),
        (
            lambda: distributed.all_reduce_mean({"w": torch.ones(2)}, weight=-1),
            ValueError,
            "`weight` must be finite and >= 0, got -1",
        ),
        (
            lambda: distributed.all_reduce_mean({"w": torch.ones(2)}, weight=True),
            TypeError,
            "`weight` must be a number",
        ),
        (
            lambda: distributed.all_reduce_mean({"w": torch.ones(2)}, bucket_bytes=0),
            ValueError,
            "`bucket_bytes` must be an int >= 1, got 0",
        ),
        (lambda: distributed.broadcast_params([1]), TypeError, "must be a dict {name: tensor}"),
        (lambda: distributed.broadcast_params({"w": 1}), TypeError, r"params\['w'\] must be a"),
        (lambda: distributed.check_in_sync(3), TypeError, "must be a dict {name: tensor}"),
        (
            lambda: distributed.check_in_sync({}, atol=-1.0),
            ValueError,
            "`atol` must be >= 0",
        ),
        (lambda: distributed.check_same_config([("k", 1)]), TypeError, "`config` must be a dict"),
        (
            lambda: distributed.gather_shards(torch.zeros(2), 3),
            ValueError,
            r"rank 0 of 1 holds tasks 0:3 of n=3, so `local` needs a leading size of 3; got "
            r"float32\[2\]",
        ),
        (
            lambda: distributed.distributed_meta_grad(
                _maml(mlp()), fmaml.params(mlp()), regression_tasks(torch.Generator()), 1, ctx=2
            ),
            TypeError,
            "`ctx` must be the Context from setup",
        ),
    ],
)
def test_errors(no_torchrun, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_an_index_less_cuda_device_means_this_ranks_gpu():
    """``setup(device="cuda")`` under torchrun: ``torch.cuda.set_device`` needs an index (torch
    2.11 refuses ``"cuda"``), so a plain ``cuda`` is ``cuda:LOCAL_RANK``; explicit ones stay."""
    from fmaml.distributed import _pick_device

    assert _pick_device("cuda", None, 3) == torch.device("cuda", 3)
    assert _pick_device(torch.device("cuda"), "nccl", 1) == torch.device("cuda", 1)
    assert _pick_device("cuda:2", None, 3) == torch.device("cuda", 2)
    assert _pick_device("cpu", None, 3) == torch.device("cpu")
