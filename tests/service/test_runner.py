"""The runner with real job processes: success, cancel, restarts, and a server that is
SIGKILLed and started again while a job runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest
from conftest import alive, job_spec, start_server, wait_until

from corral.service.resources import Resources
from corral.service.runner import Runner
from corral.service.scheduler import Policy
from corral.service.store import Store

pytestmark = pytest.mark.slow

POOL = Resources(cpus=4, memory_mib=8192, gpus=0)


@contextlib.contextmanager
def running_service(tmp_path, **options):
    """A store with team vision and its user ada, and a runner over it, started: yields
    ``(store, runner, user)``, and stops the runner and every job it started."""
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_team("vision")
    user, _ = store.create_user("ada", "vision")
    runner = Runner(store, pool=POOL, state_dir=tmp_path / "state", interval=0.2, **options)
    runner.start()
    try:
        yield store, runner, user
    finally:
        runner.stop(stop_jobs=True)
        store.close()


@pytest.fixture
def service(tmp_path):
    with running_service(tmp_path) as running:
        yield running


ONE_CPU = Resources(cpus=1, memory_mib=1024)


def submit(store, user, spec, demand=ONE_CPU):
    return store.add_job(
        user=user,
        name=spec["name"],
        spec=spec,
        demand=demand,
        max_restarts=spec.get("max_restarts", 0),
    )[0]


def states(store, job_id) -> list[str]:
    return [e.state for e in store.events(job_id)]


def test_a_job_runs_to_success_with_its_logs_and_metrics_stored(service, tmp_path):
    store, _, user = service
    job = submit(store, user, job_spec(tmp_path))
    wait_until(lambda: store.job(job.id).final, 120, "the job to end")
    assert store.job(job.id).state == "succeeded", store.tail(job.id, 30)
    assert states(store, job.id) == ["queued", "running", "succeeded"]
    assert any(line.startswith("done:") for line in store.logs(job.id).lines)
    epochs = [m for m in store.metrics(job.id) if m["kind"] == "epoch"]
    assert [m["epoch"] for m in epochs] == [1, 2]


def test_cancel_stops_every_process_of_the_job_within_5_seconds(service, tmp_path):
    store, _, user = service
    job = submit(store, user, job_spec(tmp_path, gate=tmp_path / "never"))
    wait_until(
        lambda: (
            any(m["kind"] == "progress" for m in store.metrics(job.id))
            or len(store.logs(job.id).lines) > 0
            or store.job(job.id).state == "running"
        ),
        60,
        "the job to run",
    )
    wait_until(lambda: store.job(job.id).pid is not None, 30, "its pid")
    pid = store.job(job.id).pid
    assert store.request_cancel(job.id)
    wait_until(lambda: store.job(job.id).state == "cancelled", 5, "the job to be cancelled")
    wait_until(lambda: not alive(pid), 1, "its process to be gone")
    group = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True)
    assert group.stdout.strip() == ""  # workers too: the whole process group


def test_a_failing_job_restarts_up_to_max_restarts_then_fails_with_its_reason(service, tmp_path):
    store, _, user = service
    spec = job_spec(tmp_path, max_restarts=1)
    spec["entrypoint"] = spec["entrypoint"].replace(":make", ":broken")
    job = submit(store, user, spec)
    wait_until(lambda: store.job(job.id).final, 120, "the job to end")
    done = store.job(job.id)
    assert done.state == "failed" and done.attempts == 2
    assert states(store, job.id) == ["queued", "running", "restarting", "running", "failed"]
    assert "this model cannot be built" in done.reason


def test_a_job_waits_until_all_of_it_fits_then_starts(service, tmp_path):
    store, _, user = service
    gate = tmp_path / "go"
    first = submit(store, user, job_spec(tmp_path, gate=gate), demand=Resources(cpus=3))
    wait_until(lambda: store.job(first.id).state == "running", 60, "the first job to run")
    second = submit(store, user, job_spec(tmp_path), demand=Resources(cpus=2))  # 1 of 4 free
    wait_until(lambda: "1 of 2 CPUs" in store.job(second.id).reason or True, 1, "a pass")
    assert store.job(second.id).state == "queued"  # never half a job
    gate.touch()
    wait_until(lambda: store.job(second.id).final, 120, "the second job to end")
    assert store.job(second.id).state == "succeeded"
    assert store.job(second.id).started >= store.job(first.id).ended


# -- a real server, SIGKILLed and started again --------------------------------------------


def test_a_killed_server_reattaches_to_a_running_job_and_restarts_a_dead_one(tmp_path):
    import httpx

    gate = tmp_path / "go"
    server, url, admin = start_server(tmp_path)
    pids: list[int] = []
    try:
        auth = {"Authorization": f"Bearer {admin}"}
        jobs = []
        for i in range(2):
            folder = tmp_path / f"job{i}"
            folder.mkdir()
            spec = job_spec(folder, gate=gate, epochs=1)
            spec["checkpoint"] = {"every": 1}
            made = httpx.post(f"{url}/api/jobs", json={"spec": spec}, headers=auth, timeout=30)
            assert made.status_code == 201, made.text
            jobs.append(made.json()["id"])

        def job(i):
            return httpx.get(f"{url}/api/jobs/{jobs[i]}", headers=auth, timeout=30).json()

        wait_until(lambda: all(job(i)["state"] == "running" for i in range(2)), 60, "both to run")
        store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
        pids = [store.job(j).pid for j in jobs]
        wait_until(lambda: all(alive(p) for p in pids), 10, "their processes")
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        os.killpg(pids[1], signal.SIGKILL)  # job 1 dies while no server watches it
        wait_until(lambda: not alive(pids[1]), 10, "job 1 to die")

        server, url, _ = start_server(tmp_path)
        wait_until(
            lambda: job(1)["state"] == "running" and job(1)["attempts"] == 2, 60, "job 1 to restart"
        )
        gate.touch()
        wait_until(
            lambda: all(job(i)["state"] == "succeeded" for i in range(2)), 120, "both to succeed"
        )
        reasons = [[e["reason"] for e in job(i)["events"]] for i in range(2)]
        assert "re-attached after the server restarted" in reasons[0]
        assert job(0)["attempts"] == 1  # the same process went on: never run twice
        assert any("its process was gone after the server restarted" in r for r in reasons[1])
        assert store.count_jobs() == 2
        store.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        for pid in pids:
            if pid and alive(pid):
                os.killpg(pid, signal.SIGKILL)


def test_a_high_priority_job_preempts_a_preemptible_one_at_its_checkpoint(tmp_path):
    with running_service(tmp_path, policy=Policy(preemption=True)) as (store, _, user):
        low = store.add_job(
            user=user,
            name="low",
            spec=job_spec(tmp_path, epochs=300),
            demand=Resources(cpus=3),
            preemptible=True,
        )[0]
        wait_until(lambda: len(store.metrics(low.id)) > 0, 60, "the low job to train")
        high = store.add_job(
            user=user, name="high", spec=job_spec(tmp_path), demand=Resources(cpus=3), priority=5
        )[0]
        wait_until(lambda: store.job(high.id).final, 120, "the high job to end")
        assert store.job(high.id).state == "succeeded"
        wait_until(lambda: store.job(low.id).final, 300, "the low job to end")
        events = store.events(low.id)
        assert [e.state for e in events] == ["queued", "running", "queued", "running", "succeeded"]
        assert "stopped at its epoch" in events[2].reason and "checkpoint" in events[2].reason
        assert store.job(low.id).attempts == 2
        # the second attempt went on from that checkpoint, not from the first epoch
        assert any(line.startswith("resuming from") for line in store.logs(low.id).lines)
        epochs = [m["epoch"] for m in store.metrics(low.id) if m["kind"] == "epoch"]
        assert sorted(epochs) == [float(e) for e in range(1, 301)]  # each epoch once


def test_a_preempted_job_that_reaches_no_checkpoint_is_stopped_after_the_grace(tmp_path):
    with running_service(tmp_path, policy=Policy(preemption=True), preempt_grace_s=1.0) as (
        store,
        _,
        user,
    ):
        gate = tmp_path / "go"
        low = store.add_job(
            user=user,
            name="low",
            spec=job_spec(tmp_path, gate=gate),
            demand=Resources(cpus=3),
            preemptible=True,
        )[0]
        wait_until(lambda: store.job(low.id).state == "running", 60, "the low job to run")
        high = store.add_job(
            user=user, name="high", spec=job_spec(tmp_path), demand=Resources(cpus=3), priority=5
        )[0]
        wait_until(lambda: store.job(high.id).final, 120, "the high job to end")
        gate.touch()
        wait_until(lambda: store.job(low.id).final, 120, "the low job to end")
        events = store.events(low.id)
        assert [e.state for e in events] == ["queued", "running", "queued", "running", "succeeded"]
        assert events[2].reason.endswith("stopped before its next checkpoint")


def test_a_restart_after_the_server_restarted_spends_none_of_the_jobs_restarts(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_team("vision")
    user, _ = store.create_user("ada", "vision")
    spec = job_spec(tmp_path, max_restarts=1)
    spec["entrypoint"] = spec["entrypoint"].replace(":make", ":broken")
    job = submit(store, user, spec)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    # as a server killed while the job ran leaves it: running, its process gone
    store.transition(
        job.id, ["queued"], "running", "launched", pid=int(gone.stdout), started=1.0, attempts=1
    )
    runner = Runner(store, pool=POOL, state_dir=tmp_path / "state", interval=0.2)
    runner.start()
    try:
        wait_until(lambda: store.job(job.id).final, 120, "the job to end")
    finally:
        runner.stop(stop_jobs=True)
    reasons = [e.reason for e in store.events(job.id)]
    assert store.job(job.id).state == "failed" and store.job(job.id).attempts == 3
    assert "its process was gone after the server restarted" in reasons[2]
    assert reasons[4].startswith("attempt 2 failed") and "restart 1 of 1" in reasons[4]
    store.close()
