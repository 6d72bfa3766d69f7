"""corral.run with real worker processes: results, failures, signals, restarts, orphans."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import alive, read_pids, record_pid, wait_until

import corral
from corral.errors import LaunchError, SpecError, WorkerError

pytestmark = pytest.mark.slow


def ddp_tutorial_step() -> dict:
    """Written as in PyTorch's DDP tutorial: env:// rendezvous, DDP, one step."""
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    weights = [torch.zeros(4) for _ in range(dist.get_world_size())]
    dist.all_gather(weights, model.module.weight.detach()[0])
    env = {
        k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    }
    dist.destroy_process_group()
    return {"env": env, "weights": weights}


def test_runs_unchanged_ddp_code_and_returns_rank_zero_value():
    out = corral.run(ddp_tutorial_step, workers=4)
    assert out["env"]["RANK"] == "0" and out["env"]["WORLD_SIZE"] == "4"
    assert out["env"]["MASTER_ADDR"] == "127.0.0.1"
    assert all(torch.equal(w, out["weights"][0]) for w in out["weights"])  # replicas agree


def noisy(x: int) -> int:
    print("chatter on stdout", flush=True)
    print("chatter on stderr", file=sys.stderr, flush=True)
    return x * 2


def test_result_does_not_travel_through_stdout_and_logs_are_prefixed(capfd):
    assert corral.run(noisy, 21, workers=2) == 42
    err = capfd.readouterr().err
    assert "[worker 1] chatter on stdout" in err
    assert "[worker 0] chatter on stderr" in err


def raise_on_rank_one(pid_dir: str, stamp: str) -> None:
    record_pid(pid_dir)
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        Path(stamp).write_text(str(time.time()))
        raise ValueError("bad batch 7")
    time.sleep(600)  # the others must be stopped by corral, not finish


def test_worker_exception_fails_fast_with_rank_type_and_traceback(tmp_path, pid_dir):
    stamp = tmp_path / "raised"
    with pytest.raises(WorkerError) as info:
        corral.run(raise_on_rank_one, str(pid_dir), str(stamp), workers=3)
    noticed = time.time()
    err = info.value
    assert (err.rank, err.exc_type, err.detail) == (1, "ValueError", "bad batch 7")
    assert "raise_on_rank_one" in err.remote_traceback
    assert "worker 1 raised ValueError: bad batch 7" in str(err)
    # seconds, not the 600 s the peers sleep nor gloo's timeout: margin for a loaded machine
    assert noticed - float(stamp.read_text()) < 10.0
    assert len(read_pids(pid_dir)) == 3
    assert not [p for p in read_pids(pid_dir) if alive(p)]


def kill_rank_one(pid_dir: str, stamp: str) -> None:
    record_pid(pid_dir)
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        Path(stamp).write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)


def test_worker_killed_by_signal_is_named(tmp_path, pid_dir):
    stamp = tmp_path / "killed"
    with pytest.raises(WorkerError) as info:
        corral.run(kill_rank_one, str(pid_dir), str(stamp), workers=2)
    assert time.time() - float(stamp.read_text()) < 10.0  # not the 600 s rank 0 sleeps
    assert info.value.rank == 1 and "killed by SIGKILL" in str(info.value)
    assert not [p for p in read_pids(pid_dir) if alive(p)]


def spawn_grandchild(pid_dir: str) -> None:
    child = subprocess.Popen(["sleep", "600"])
    Path(pid_dir, str(child.pid)).touch()
    raise RuntimeError("leaving a grandchild behind")


def test_grandchildren_are_stopped_too(pid_dir):
    with pytest.raises(WorkerError, match="leaving a grandchild"):
        corral.run(spawn_grandchild, str(pid_dir), workers=1)
    (grandchild,) = read_pids(pid_dir)
    wait_until(lambda: not alive(grandchild), 30, "the grandchild to be killed")


DRIVER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import corral
    from conftest import record_pid

    def forever(pid_dir):
        record_pid(pid_dir)
        time.sleep(600)

    if __name__ == "__main__":
        corral.run(forever, {pids!r}, workers=2)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signal_on_the_caller_leaves_no_worker_behind(tmp_path, pid_dir, sig):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parents[1]), pids=str(pid_dir)))
    driver = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(read_pids(pid_dir)) == 2, 60, "both workers to start")
        driver.send_signal(sig)
        pids = read_pids(pid_dir)
        wait_until(lambda: not any(alive(p) for p in pids), 30, "workers to exit")
        driver.wait(timeout=10)
    finally:
        driver.kill()
        driver.wait()


def test_a_taken_master_port_gets_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LaunchError, match=f"master_port {port} on 127.0.0.1 is already in use"):
            corral.run(noisy, 1, workers=2, master_port=port)


def test_workers_must_be_positive():
    with pytest.raises(SpecError, match="workers: must be at least 1"):
        corral.run(noisy, 1, workers=0)


def die_once_then_resume() -> dict:
    ctx = corral.context()
    state = ctx.latest_checkpoint()
    if ctx.restart_count == 0:
        if ctx.rank == 0:
            ctx.checkpoint({"progress": 5})
        dist.init_process_group("gloo")
        dist.barrier()  # the checkpoint exists before rank 1 dies
        if ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    return {"restarts": ctx.restart_count, "progress": state and state["progress"]}


def test_max_restarts_relaunches_the_group_from_the_newest_checkpoint(tmp_path):
    out = corral.run(die_once_then_resume, workers=2, max_restarts=1, checkpoint_dir=tmp_path)
    assert out == {"restarts": 1, "progress": 5}


def bad_input_error() -> None:
    raise corral.DataError("column 'x' is missing")


def test_errors_a_restart_cannot_fix_are_not_retried():
    with pytest.raises(WorkerError) as info:
        corral.run(bad_input_error, workers=1, max_restarts=3)
    assert info.value.restarts == 0 and info.value.exc_type == "DataError"


def exits(code: int) -> None:
    sys.exit(code)


def test_sys_exit_zero_is_success_and_non_zero_is_failure():
    assert corral.run(exits, 0, workers=1) is None
    with pytest.raises(WorkerError, match="exit code 3"):
        corral.run(exits, 3, workers=1)


def returns_a_lock():
    import threading

    return threading.Lock()


def test_an_unpicklable_result_is_reported():
    with pytest.raises(WorkerError, match="cannot be pickled"):
        corral.run(returns_a_lock, workers=1)


def test_context_outside_a_worker_is_an_error():
    with pytest.raises(corral.CorralError, match="only available inside a worker"):
        corral.context()
