"""What only the local engine does: refuse, before any start, a plan it cannot run.

What every engine does (exits, logs, signals, stop, resources) is `test_contract.py`;
the GPUs each process sees, `test_gpu_env.py`.
"""

from __future__ import annotations

import sys

import pytest

from corral.engines import LocalEngine, Plan, ProcessSpec
from corral.engines.local import available_gpus
from corral.errors import LaunchError
from corral.runtime.resources import Resources


def proc(rank: int, code: str, **resources) -> ProcessSpec:
    return ProcessSpec(
        role="worker",
        rank=rank,
        argv=[sys.executable, "-c", code],
        resources=Resources(**resources),
    )


def test_gpus_the_machine_lacks_are_refused():
    more = len(available_gpus()) + 1  # one more than this machine has, GPUs or not
    with pytest.raises(LaunchError, match=f"asks for {more} GPU"):
        LocalEngine().launch(Plan(processes=[proc(r, "pass", gpus=1) for r in range(more)]))


def test_memory_the_machine_lacks_is_refused():
    with pytest.raises(LaunchError, match="MiB of memory in all but this machine has"):
        LocalEngine().launch(Plan(processes=[proc(0, "pass", memory_mib=10**9)]))


def test_a_command_that_cannot_start_stops_the_ones_that_did():
    first = proc(0, "import time; time.sleep(600)")
    missing = ProcessSpec(role="worker", rank=1, argv=["/no/such/binary"])
    with pytest.raises(LaunchError, match="cannot start worker 1"):
        LocalEngine().launch(Plan(processes=[first, missing]))
