"""The runner's own state survives a SIGKILL at any instant: a runner process (forked, so
it starts at once) is killed just before, or just after, the commit that copies a job's
log and metrics lines into the store, and the next runner copies each line exactly once
(SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import traceback
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from corral.runtime.resources import Resources
from corral.service.job import LOG, METRICS, write_exit
from corral.service.runner import Runner
from corral.service.store import Store


def _killed_runner(url: str, state_dir: Path, when: str) -> None:
    """In a forked process: a runner that settles the jobs it finds, SIGKILLed at the
    commit of the first transaction that adds log lines, just before it reaches the
    database or just after."""
    store = Store(url)
    copying = False

    @event.listens_for(store.engine, "before_cursor_execute")
    def spot(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal copying
        copying = copying or statement.lstrip().lower().startswith("insert into logs")

    dialect = store.engine.dialect
    commit = dialect.do_commit

    def do_commit(dbapi_connection: Any) -> None:
        if copying and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        commit(dbapi_connection)
        if copying and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    dialect.do_commit = do_commit  # type: ignore[method-assign]
    runner = Runner(store, pool=Resources(cpus=1), state_dir=state_dir)
    runner.recover()
    runner.tick()


def _run_killed(url: str, state_dir: Path, when: str) -> int:
    """Fork a `_killed_runner`; the signal that ended it (0 if none did)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            _killed_runner(url, state_dir, when)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


LINES = ["epoch 1/2 loss 0.5", "epoch 2/2 loss 0.25", "done: {}"]
ROWS = [{"kind": "epoch", "epoch": 1}, {"kind": "epoch", "epoch": 2}]


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_runner_killed_at_the_commit_of_copied_lines_copies_each_once(tmp_path, store_url, when):
    store = Store(store_url)
    store.create_team("vision")
    user, _ = store.create_user("ada", "vision")
    job, _ = store.add_job(user=user, name="tiny", spec={}, demand=Resources(cpus=1))
    # a job that finished while no server watched it: its files wait to be copied
    store.transition(job.id, ["queued"], "running", "launched", attempts=1)
    state_dir = tmp_path / "state"
    runner = Runner(store, pool=Resources(cpus=1), state_dir=state_dir)
    folder = runner.folder(job.id)
    folder.mkdir(parents=True)
    (folder / LOG).write_text("".join(f"{line}\n" for line in LINES))
    (folder / METRICS).write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    write_exit(folder, {"code": 0, "error": None, "restarts": 0, "final": False})

    assert _run_killed(store_url, state_dir, when) == signal.SIGKILL
    assert store.job(job.id).state == "running"  # killed before it could settle the job
    assert len(store.logs(job.id).lines) == (len(LINES) if when == "after" else 0)

    runner.recover()  # the server started again
    runner.tick()
    assert store.job(job.id).state == "succeeded"
    assert store.logs(job.id).lines == LINES
    assert store.metrics(job.id) == ROWS
    store.close()
