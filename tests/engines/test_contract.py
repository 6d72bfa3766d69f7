"""The engine contract: the same tests against every engine (local processes, Spark tasks).

An engine runs a `Plan` of processes and reports how each one ended; the launcher relies on
nothing else. So every test here launches plain Python commands, not training, and runs
once on the local engine and once on a real Spark local[2] session. The commands do not
run corral's parent watchdog (`corral.engines.watchdog`): stopping them is the engine's
own work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import alive, read_pids, wait_until

import corral
from corral.engines.base import Engine, Exit, Plan, ProcessSpec, WorkerGroup
from corral.engines.local import LocalEngine
from corral.errors import WorkerError
from corral.runtime.resources import Resources

pytestmark = pytest.mark.slow

#: Leaves a file named after the process's pid in the folder named by its first argument.
RECORD_PID = "import os, sys; open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close()\n"


@pytest.fixture(params=["local", pytest.param("spark", marks=pytest.mark.spark)])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each engine in turn; Spark on the session's shared local[2] session."""
    if request.param == "local":
        return LocalEngine()
    return corral.SparkEngine(request.getfixturevalue("spark"))


def command(rank: int, code: str, *args: str, **spec: Any) -> ProcessSpec:
    """Worker `rank` running `code` with `args` as ``sys.argv[1:]``; `spec` sets other
    fields (``env``, ``resources``)."""
    argv = [sys.executable, "-c", code, *args]
    return ProcessSpec(role="worker", rank=rank, argv=argv, **spec)


@contextlib.contextmanager
def launched(engine: Engine, *processes: ProcessSpec) -> Iterator[WorkerGroup]:
    """The running group of `processes`, stopped however the test ends."""
    group = engine.launch(Plan(processes=list(processes)))
    try:
        yield group
    finally:
        group.stop()


def by_rank(exits: list[Exit]) -> dict[int, Exit]:
    return {e.rank: e for e in exits}


def test_a_plan_runs_to_each_exit_code(engine):
    with launched(engine, command(0, "pass"), command(1, "import sys; sys.exit(3)")) as group:
        exits = by_rank(group.wait(timeout=120))
    assert (exits[0].returncode, exits[1].returncode) == (0, 3)
    assert exits[1].how() == "exited with code 3" and exits[1].signal_name is None


def test_each_log_is_kept_apart_and_forwarded_with_its_prefix(engine, capsys):
    with launched(
        engine,
        command(0, "print('zero')"),
        command(1, "import sys; print('one'); sys.exit(3)"),
    ) as group:
        group.wait(timeout=120)
    assert (group.logs("worker", 0), group.logs("worker", 1)) == ("zero", "one")
    err = capsys.readouterr().err  # forwarded by this process, prefixed
    assert "[worker 0] zero" in err and "[worker 1] one" in err


def test_a_sigkilled_rank_is_seen_while_its_peer_runs_and_stop_ends_the_peer(engine, pid_dir):
    forever = RECORD_PID + "import time; time.sleep(600)"
    suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    with launched(engine, command(0, forever, str(pid_dir)), command(1, suicide)) as group:
        wait_until(lambda: group.poll(), 120, "the killed rank's exit")
        (killed,) = group.poll()
        assert (killed.rank, killed.returncode) == (1, -signal.SIGKILL)
        assert killed.how() == "was killed by SIGKILL"
        wait_until(lambda: read_pids(pid_dir), 60, "rank 0 to start")
    (peer,) = read_pids(pid_dir)
    wait_until(lambda: not alive(peer), 30, "the stopped peer to end")
    assert by_rank(group.poll())[0].returncode != 0  # stopped, not finished


def test_stop_leaves_no_process_and_no_grandchild_behind(engine, pid_dir):
    spawn = RECORD_PID + (
        "import subprocess; child = subprocess.Popen(['sleep', '600'])\n"
        "open(os.path.join(sys.argv[1], str(child.pid)), 'w').close(); child.wait()"
    )
    with launched(engine, command(0, spawn, str(pid_dir)), command(1, spawn, str(pid_dir))):
        wait_until(lambda: len(read_pids(pid_dir)) == 4, 120, "two processes and two children")
    pids = read_pids(pid_dir)
    wait_until(lambda: not any(alive(p) for p in pids), 30, "every process and child to end")


#: Writes the variables the engine sets (and one the spec sets) to the file ``sys.argv[1]``.
SHOW_ENV = (
    "import os, sys\n"
    "names = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'CUDA_VISIBLE_DEVICES', 'ASKED')\n"
    "open(sys.argv[1], 'w').write(repr([os.environ.get(n) for n in names]))"
)


def test_resources_and_environment_reach_the_process(engine, tmp_path):
    """CPUs asked for pin the thread pools; no GPU asked for means none visible, even on
    a machine (or executor) that has GPUs; the spec's environment arrives as given."""
    seen = [tmp_path / "0", tmp_path / "1"]
    asked = command(0, SHOW_ENV, str(seen[0]), env={"ASKED": "yes"}, resources=Resources(cpus=2))
    with launched(engine, asked, command(1, SHOW_ENV, str(seen[1]))) as group:
        exits = by_rank(group.wait(timeout=120))
    assert [exits[r].returncode for r in (0, 1)] == [0, 0]
    assert seen[0].read_text() == repr(["2", "2", "", "yes"])
    assert seen[1].read_text() == repr(["1", "1", "", None])


def test_logs_hold_what_a_running_process_printed_so_far(engine):
    ready = "print('ready', flush=True); import time; time.sleep(600)"
    with launched(engine, command(0, ready)) as group:
        wait_until(lambda: group.logs("worker", 0) == "ready", 10, "'ready' in its log")


def rank_value() -> int:
    return 10 * int(os.environ["RANK"]) + 7


def kill_rank_one(pid_dir: str) -> None:
    """Both ranks record their pid; then rank 1 dies and rank 0 waits to be stopped."""
    Path(pid_dir, str(os.getpid())).touch()
    if os.environ["RANK"] == "1":
        while len(read_pids(Path(pid_dir))) < 2:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)


def test_run_returns_rank_zeros_value_and_names_a_killed_rank(engine, pid_dir):
    assert corral.run(rank_value, workers=2, engine=engine) == 7
    with pytest.raises(WorkerError, match="worker 1 was killed by SIGKILL"):
        corral.run(kill_rank_one, str(pid_dir), workers=2, engine=engine)
    pids = read_pids(pid_dir)
    assert len(pids) == 2
    wait_until(lambda: not any(alive(p) for p in pids), 30, "both workers to end")
