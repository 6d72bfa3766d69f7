"""The runner with real job processes: success, cancel, one restart budget for the runner
and the launcher, errors no restart can fix, and a server that is SIGKILLed and started
again while a job runs. The tests that go through the store run on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import alive, job_spec, start_server, wait_until

from corral.runtime.resources import Resources
from corral.service.cluster import cluster_state
from corral.service.runner import Runner
from corral.service.scheduler import Policy, Wait, explain
from corral.service.store import Store

pytestmark = pytest.mark.slow

POOL = Resources(cpus=4, memory_mib=8192, gpus=0)


@contextlib.contextmanager
def running_service(tmp_path, url=None, **options):
    """A store (SQLite unless `url`) with team vision and its user ada, and a runner over
    it, started: yields ``(store, runner, user)``, and stops the runner and every job it
    started."""
    store = Store(url or f"sqlite:///{tmp_path / 'db.sqlite'}")
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


def dying_job(folder: Path, **extra) -> tuple[dict, Path]:
    """A job whose every worker dies of SIGKILL at its first step, the first one taking
    the job's process with it; and the file with a line per worker start.
    Its file also has a model that `trains`, one `broken` and a `nan_loss`."""
    spec = job_spec(folder, **extra)
    model = Path(spec["entrypoint"].split(":")[0]).with_name("dies.py")
    starts = model.with_name("starts")
    model.write_text(
        textwrap.dedent(f"""
        import os, signal
        import torch

        class Dies(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Linear(2, 2)

            def forward(self, x):
                with open({str(starts)!r}, "a") as f:
                    f.write(f"{{os.getpid()}}\\n")
                with open({str(starts)!r}) as f:
                    first = len(f.readlines()) == 1
                os.kill(job_process() if first else os.getpid(), signal.SIGKILL)

        def job_process():
            # the farthest ancestor in this folder (the worker's parent may be the
            # job's fork server, a copy of it)
            pid, here = os.getpid(), os.getcwd()
            while True:
                with open(f"/proc/{{pid}}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                if parent <= 1 or os.readlink(f"/proc/{{parent}}/cwd") != here:
                    return pid
                pid = parent

        def make():
            return Dies()

        def trains():
            return torch.nn.Linear(2, 2)

        def broken():
            raise RuntimeError("this model cannot be built")

        def nan_loss(out, y):
            return torch.nn.functional.cross_entropy(out, y) * float("nan")
        """)
    )
    spec["entrypoint"] = f"{model}:make"
    return spec, starts


def test_a_job_runs_to_success_with_its_logs_and_metrics_stored(tmp_path, store_url):
    with running_service(tmp_path, store_url) as (store, _, user):
        job = submit(store, user, job_spec(tmp_path))
        wait_until(lambda: store.job(job.id).final, 120, "the job to end")
        assert store.job(job.id).state == "succeeded", store.tail(job.id, 30)
        assert states(store, job.id) == ["queued", "running", "succeeded"]
        lines = store.logs(job.id).lines
        assert sum(line.startswith("done:") for line in lines) == 1
        assert sum(line.startswith("epoch 1/2") for line in lines) == 1  # copied once
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


@pytest.mark.parametrize(
    ("entrypoint", "loss", "message"),
    [
        ("broken", None, "model: the factory broken raised RuntimeError"),  # in the job
        # in a worker, which the launcher in the job does not restart either
        ("trains", "nan_loss", "raised TrainingError: the loss became nan at epoch 1"),
    ],
)
def test_an_error_no_restart_can_fix_fails_the_job_once_with_its_message(
    service, tmp_path, entrypoint, loss, message
):
    store, _, user = service
    spec, _ = dying_job(tmp_path, max_restarts=2)
    file = spec["entrypoint"].split(":")[0]
    spec["entrypoint"] = f"{file}:{entrypoint}"
    if loss is not None:
        spec["loss"] = f"{file}:{loss}"
    job = submit(store, user, spec)
    wait_until(lambda: store.job(job.id).final, 120, "the job to end")
    done = store.job(job.id)
    assert states(store, job.id) == ["queued", "running", "failed"], done.reason
    assert done.attempts == 1 and store.restarts_spent(job.id) == 0
    assert message in done.reason and not done.reason.startswith("failed")


def test_a_job_waits_until_all_of_it_fits_then_starts(service, tmp_path):
    store, runner, user = service
    gate = tmp_path / "go"
    first = submit(store, user, job_spec(tmp_path, gate=gate, epochs=1), demand=Resources(cpus=3))
    wait_until(lambda: store.job(first.id).state == "running", 60, "the first job to run")
    second = submit(store, user, job_spec(tmp_path), demand=Resources(cpus=2))  # 1 of 4 free
    seen = runner.passes + 2  # the pass under way may have begun before the submit
    wait_until(lambda: runner.passes >= seen, 30, "a pass that saw the second job")
    assert store.job(second.id).state == "queued"  # never half a job
    why = [d for d in explain(cluster_state(store, POOL), time.time()) if isinstance(d, Wait)]
    assert why == [
        Wait(second.id, "waiting: pool has 1 of 4 CPUs free, the job needs 2; next in line")
    ]
    gate.touch()
    wait_until(lambda: store.job(second.id).state != "queued", 120, "the second job to start")
    assert store.job(first.id).state == "succeeded"
    assert store.job(second.id).started >= store.job(first.id).ended


# -- a real server, SIGKILLed and started again --------------------------------------------


def test_a_killed_server_reattaches_to_a_running_job_and_restarts_a_dead_one(tmp_path, store_url):
    import httpx

    gate = tmp_path / "go"
    options = ("--db", store_url, "--cpus", "4")  # the last --db given wins
    server, url, admin = start_server(tmp_path, *options)
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
        store = Store(store_url)
        pids = [store.job(j).pid for j in jobs]
        wait_until(lambda: all(alive(p) for p in pids), 10, "their processes")
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        os.killpg(pids[1], signal.SIGKILL)  # job 1 dies while no server watches it
        wait_until(lambda: not alive(pids[1]), 10, "job 1 to die")

        server, url, _ = start_server(tmp_path, *options)
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


def test_max_restarts_is_spent_once_by_the_runner_and_the_launcher_together(tmp_path):
    """max_restarts=2 and every worker dies: 3 worker starts in all. A server restart
    spends none; the runner restarts the job's process that died with its first worker
    (restart 1 of 2); the launcher in the next one spends the last restart on its worker,
    gives up, and the job fails with the worker's error, never restarted again."""
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_team("vision")
    user, _ = store.create_user("ada", "vision")
    spec, starts = dying_job(tmp_path, max_restarts=2)
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
    done, events = store.job(job.id), store.events(job.id)
    assert len(starts.read_text().split()) == 3
    assert [e.state for e in events] == [
        *("queued", "running", "restarting", "running", "restarting", "running", "failed")
    ]
    assert events[2].reason == (
        "its process was gone after the server restarted; restarting from the start "
        "(no checkpoint yet)"
    )
    assert events[4].reason == (
        "attempt 2 failed (its process ended with SIGKILL); restart 1 of 2, from the start "
        "(no checkpoint yet)"
    )
    assert done.state == "failed" and done.attempts == 3
    assert done.reason.startswith("worker 0 ") and "SIGKILL (after 1 restart(s))" in done.reason
    assert [e.restarts for e in events] == [0, 0, 0, 0, 1, 0, 1]
    store.close()
