"""The runner's decisions with scripted attempts instead of job processes: what each
attempt's end does to the job (success, a restart spending the budget once, a verdict
never restarted, a cancel), on a real SQLite store and without a process or a sleep.

Each test drives `Runner.tick` by hand; the real processes are `test_runner.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corral.runtime.resources import Resources
from corral.service.job import LOG, METRICS
from corral.service.runner import ExitStatus, Runner
from corral.service.store import Job, Store

POOL = Resources(cpus=4, memory_mib=8192, gpus=0)


@dataclass
class Scripted:
    """An attempt that has already ended with `status`, or runs until stopped (None)."""

    job_id: str
    folder: Path
    status: ExitStatus | None
    pid: int = -1
    offsets: dict[str, int] = field(default_factory=lambda: {LOG: 0, METRICS: 0})
    stopped: bool = False

    def alive(self) -> bool:
        return self.status is None and not self.stopped

    def exit_status(self) -> ExitStatus | None:
        return self.status

    def stop(self) -> None:
        self.stopped = True

    def exceeded(self) -> str | None:
        return None

    def release(self) -> None:
        pass


class Script:
    """Starts attempts that end as `outcomes` say, one per start, in order."""

    def __init__(self, *outcomes: ExitStatus | None) -> None:
        self.outcomes = list(outcomes)
        self.started: list[Scripted] = []

    def __call__(self, job: Job, folder: Path) -> Scripted:
        attempt = Scripted(job.id, folder, self.outcomes.pop(0))
        self.started.append(attempt)
        return attempt


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_team("vision")
    yield store
    store.close()


def run_job(store: Store, tmp_path: Path, script: Script, *, max_restarts: int) -> Job:
    """Submit one job and tick until it ended (each tick reaps what the last started)."""
    user, _ = store.create_user(f"u{len(store.users())}", "vision")
    job, _ = store.add_job(
        user=user,
        name="scripted",
        spec={"name": "scripted"},
        demand=Resources(cpus=1, memory_mib=512),
        max_restarts=max_restarts,
    )
    runner = Runner(store, pool=POOL, state_dir=tmp_path / "state", start_attempt=script)
    for _ in range(10):
        runner.tick()
        done = store.job(job.id)
        assert done is not None
        if done.final:
            return done
    raise AssertionError(f"the job did not end: {[e.state for e in store.events(job.id)]}")


def test_success_ends_the_job_after_one_attempt(store, tmp_path):
    script = Script(ExitStatus(0, None))
    done = run_job(store, tmp_path, script, max_restarts=2)
    assert done.state == "succeeded" and done.attempts == 1 and len(script.started) == 1


def test_the_budget_is_spent_once_by_the_launcher_and_the_runner(store, tmp_path):
    """max_restarts=2: the first attempt's launcher spent 1 inside it, then its process
    died; the runner restarts it once (2 of 2), and the second's death ends the job."""
    died = "its process ended with SIGKILL"
    script = Script(ExitStatus(-9, died, restarts=1), ExitStatus(-9, died))
    done = run_job(store, tmp_path, script, max_restarts=2)
    assert done.state == "failed" and done.attempts == 2
    assert store.restarts_spent(done.id) == 2
    restart = [e for e in store.events(done.id) if e.state == "restarting"]
    assert [e.reason for e in restart] == [
        f"attempt 1 failed ({died}); restart 2 of 2, from the start (no checkpoint yet)"
    ]
    assert done.reason == f"{died}; no restarts left (max_restarts=2)"


def test_an_attempts_own_verdict_is_never_restarted(store, tmp_path):
    nan = "the loss became nan at epoch 1, step 3 on worker 0"
    script = Script(ExitStatus(1, nan, final=True), ExitStatus(0, None))
    done = run_job(store, tmp_path, script, max_restarts=3)
    assert done.state == "failed" and done.reason == nan
    assert len(script.started) == 1 and store.restarts_spent(done.id) == 0


def test_a_cancel_stops_the_running_attempt(store, tmp_path):
    script = Script(None)
    user, _ = store.create_user("ada", "vision")
    job, _ = store.add_job(
        user=user, name="long", spec={}, demand=Resources(cpus=1, memory_mib=512)
    )
    runner = Runner(store, pool=POOL, state_dir=tmp_path / "state", start_attempt=script)
    runner.tick()
    assert store.job(job.id).state == "running"
    store.request_cancel(job.id)
    runner.tick()
    (attempt,) = script.started
    assert attempt.stopped and store.job(job.id).state == "cancelled"


def test_a_teams_spark_settings_reach_its_jobs_and_override_theirs(store, tmp_path):
    from corral.spec import SparkSpec

    user, _ = store.create_user("ada", "vision")
    mine = {"spark.kubernetes.namespace": "other-team", "spark.executor.memory": "2g"}
    job, _ = store.add_job(
        user=user,
        name="spark",
        spec={"name": "spark", "spark": {"conf": mine}},
        demand=Resources(cpus=2, memory_mib=512),
    )
    runner = Runner(
        store,
        pool=POOL,
        state_dir=tmp_path / "state",
        spark=SparkSpec(master="spark://127.0.0.1:7077"),
        spark_teams={"vision": {"spark.kubernetes.namespace": "vision"}},
    )
    conf = runner._effective_spec(job)["spark"]["conf"]
    assert conf["spark.kubernetes.namespace"] == "vision"  # not the one the job asked for
    assert conf["spark.executor.memory"] == "2g" and conf["spark.cores.max"] == "2"
