"""The local engine on plain commands: no training, just processes, groups and logs."""

from __future__ import annotations

import signal
import sys

import pytest
from conftest import alive, wait_until

from corral.engines import Exit, LocalEngine, Plan, ProcessSpec, Resources
from corral.engines.local import available_gpus
from corral.errors import LaunchError


def proc(rank: int, code: str, **resources) -> ProcessSpec:
    return ProcessSpec(
        role="worker",
        rank=rank,
        argv=[sys.executable, "-c", code],
        resources=Resources(**resources),
    )


def test_runs_a_plan_and_keeps_each_log_apart():
    group = LocalEngine().launch(
        Plan(
            processes=[
                proc(0, "print('zero')"),
                proc(1, "import sys; print('one'); sys.exit(3)"),
            ]
        )
    )
    exits = sorted(group.wait(timeout=60), key=lambda e: e.rank)
    group.stop()
    assert [e.returncode for e in exits] == [0, 3]
    assert group.logs("worker", 0) == "zero" and group.logs("worker", 1) == "one"
    assert exits[1].how() == "exited with code 3"


def test_stop_takes_the_whole_process_group():
    code = (
        "import subprocess, sys; p = subprocess.Popen(['sleep', '600']); "
        "print(p.pid, flush=True); p.wait()"
    )
    group = LocalEngine().launch(Plan(processes=[proc(0, code)]))
    wait_until(lambda: group.logs("worker", 0).strip().isdigit(), 30, "the grandchild's pid")
    grandchild = int(group.logs("worker", 0))
    group.stop(grace=0.5)
    wait_until(lambda: not alive(grandchild), 5, "the grandchild to die")
    assert group.poll()[0].returncode != 0


def test_signals_are_named():
    assert Exit(role="worker", rank=2, returncode=-signal.SIGKILL).how() == "was killed by SIGKILL"


def test_threads_are_pinned_to_the_cpus_asked_for():
    group = LocalEngine().launch(
        Plan(processes=[proc(0, "import os; print(os.environ['OMP_NUM_THREADS'])", cpus=3)])
    )
    group.wait(timeout=60)
    group.stop()
    assert group.logs("worker", 0) == "3"


def test_gpus_are_handed_out_from_the_callers_own_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-5f1c")
    show = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
    group = LocalEngine().launch(Plan(processes=[proc(0, show, gpus=1), proc(1, show, gpus=1)]))
    group.wait(timeout=60)
    group.stop()
    assert (group.logs("worker", 0), group.logs("worker", 1)) == ("2", "GPU-5f1c")


@pytest.mark.skipif(bool(available_gpus()), reason="this machine has GPUs")
def test_gpus_the_machine_lacks_are_refused():
    with pytest.raises(LaunchError, match="asks for 2 GPU"):
        LocalEngine().launch(Plan(processes=[proc(0, "pass", gpus=1), proc(1, "pass", gpus=1)]))


def test_memory_the_machine_lacks_is_refused():
    with pytest.raises(LaunchError, match="MiB of memory in all but this machine has"):
        LocalEngine().launch(Plan(processes=[proc(0, "pass", memory_mb=10**9)]))


def test_a_command_that_cannot_start_stops_the_ones_that_did():
    first = proc(0, "import time; time.sleep(600)")
    missing = ProcessSpec(role="worker", rank=1, argv=["/no/such/binary"])
    with pytest.raises(LaunchError, match="cannot start worker 1"):
        LocalEngine().launch(Plan(processes=[first, missing]))
