"""Carries the scheduler's decisions out: starts, watches, stops and restarts job processes.

Every `tick` (twice a second) the runner
1. stops jobs whose cancel was requested (SIGTERM to the job's process group, SIGKILL
   after a grace period, well within 5 seconds);
2. reaps ended processes: success, or a restart from the newest checkpoint while
   ``max_restarts`` allows, or failure, each recorded with its reason;
3. relaunches jobs in ``restarting``, which kept their resources;
4. asks the scheduler for a pass, and launches what it decides; a job it preempts is asked
   to stop at its next checkpoint (stopped anyway after a grace period), then requeued;
5. copies new log lines and metrics from the jobs' files into the store.

On a Spark service (``corral server --spark-master``) each attempt is the driver of a
Spark application of its own, on the service's cluster, asking for the cores the scheduler
gave it.

Each job attempt is a process of its own session (`corral.service.job`), not tied to the
server's life. So a server that is killed and started again finds its running jobs and
*re-attaches* to those still alive (recorded as such). It *restarts* from their last
checkpoint those that died meanwhile, unless they wrote an exit status: a job that
finished while the server was down is recorded as finished, never run twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.service.cluster import cluster_state
from corral.service.job import EXIT, LOG, METRICS, PREEMPT, PREEMPTED, SPEC
from corral.service.resources import Resources
from corral.service.scheduler import Launch, Policy, Preempt, schedule
from corral.service.store import Job, Store
from corral.spec import SparkSpec

log = logging.getLogger("corral.service")

#: How the reason of a restart after the job's own failure begins (its restarts are
#: counted from these events).
_FAILED = "attempt "
#: Seconds between SIGTERM and SIGKILL when a job is stopped.
STOP_GRACE_S = 3.0


@dataclass
class _Attempt:
    """A job process the runner watches: its own child, or one it re-attached to."""

    job_id: str
    pid: int
    folder: Path
    popen: subprocess.Popen[bytes] | None = None
    offsets: dict[str, int] = field(default_factory=lambda: {LOG: 0, METRICS: 0})

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _is_job_process(self.pid, self.folder)

    def exit_status(self) -> tuple[int | None, str | None]:
        """The attempt's exit code and error, from its exit file (None if it wrote none)."""
        try:
            status = json.loads((self.folder / EXIT).read_text())
        except (OSError, ValueError):
            if self.popen is not None and self.popen.returncode is not None:
                return self.popen.returncode, f"its process ended with {self.popen.returncode}"
            return None, None
        return int(status["code"]), status.get("error")

    def stop(self) -> None:
        """SIGTERM the attempt's process group, SIGKILL what is left after the grace."""
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 1.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + wait
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.alive():
                break
        if self.popen is not None:
            self.popen.wait()


def _is_job_process(pid: int, folder: Path) -> bool:
    """Whether `pid` is still the job process started on `folder` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat.rsplit(")", 1)[1].split()[0] == "Z"
    return not zombie and str(folder).encode() in cmdline


class Runner:
    """Runs the service's jobs as local processes, in a folder per job under `state_dir`."""

    def __init__(
        self,
        store: Store,
        *,
        pool: Resources,
        state_dir: Path,
        policy: Policy | None = None,
        interval: float = 0.5,
        spark: SparkSpec | None = None,
        preempt_grace_s: float = 120.0,
    ) -> None:
        self.store, self.pool, self.policy = store, pool, policy or Policy()
        self.spark = spark
        self.state_dir, self.interval = state_dir, interval
        self._attempts: dict[str, _Attempt] = {}
        #: Jobs asked to stop at their next checkpoint: when to stop them anyway, and why.
        self._preempting: dict[str, tuple[float, str]] = {}
        self.preempt_grace_s = preempt_grace_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def folder(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="corral-runner", daemon=True)
        self._thread.start()

    def stop(self, *, stop_jobs: bool = False) -> None:
        """Stop the loop; the jobs go on running (a new server re-attaches) unless asked."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if stop_jobs:
            for attempt in self._attempts.values():
                attempt.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # a pass that failed (database busy, say) is retried next tick
                log.exception("scheduling pass failed; retrying")

    def recover(self) -> None:
        """After a (re)start: re-attach to live job processes, settle the rest."""
        for job in self.store.jobs(states=["running", "restarting"]):
            folder = self.folder(job.id)
            attempt = _Attempt(job.id, job.pid or -1, folder)
            offsets = folder / "offsets.json"
            if offsets.exists():
                attempt.offsets = json.loads(offsets.read_text())
            if job.pid and attempt.alive():
                self._attempts[job.id] = attempt
                self.store.transition(
                    job.id, [job.state], job.state, "re-attached after the server restarted"
                )
                continue
            if attempt.exit_status()[0] is not None:
                self._attempts[job.id] = attempt  # reaped by the next tick, as any other
                continue
            self.store.transition(
                job.id,
                ["running", "restarting"],
                "restarting",
                "its process was gone after the server restarted; "
                "restarting from its last checkpoint",
            )

    # -- one pass -------------------------------------------------------------------

    def tick(self) -> None:
        self._cancel_requested()
        self._preempt_overdue()
        self._reap()
        for job in self.store.jobs(states=["restarting"]):
            if job.id not in self._attempts:
                self._launch(job, ["restarting"], "restarted")
        state = cluster_state(self.store, self.pool)
        for decision in schedule(state, time.time(), self.policy):
            if isinstance(decision, Launch):
                queued = self.store.job(decision.job_id)
                if queued is not None:
                    self._launch(queued, ["queued"], "launched: the job fits the pool and quota")
            elif isinstance(decision, Preempt):
                self._preempt(decision)
        self._pump()

    def _cancel_requested(self) -> None:
        for job in self.store.jobs(states=["running", "restarting"]):
            if not job.cancel_requested:
                continue
            attempt = self._attempts.pop(job.id, None)
            self._preempting.pop(job.id, None)
            if attempt is not None:
                attempt.stop()
                self._pump_one(attempt, final=True)
            self.store.transition(job.id, [job.state], "cancelled", job.reason)

    def _reap(self) -> None:
        for job_id, attempt in list(self._attempts.items()):
            if attempt.alive():
                continue
            self._pump_one(attempt, final=True)
            del self._attempts[job_id]
            job = self.store.job(job_id)
            if job is None:
                continue
            code, error = attempt.exit_status()
            if job_id in self._preempting:
                deadline, reason = self._preempting.pop(job_id)
                stopped = time.monotonic() > deadline  # by `_preempt_overdue`
                if code == PREEMPTED or stopped:
                    how = error if code == PREEMPTED else "stopped before its next checkpoint"
                    self.store.transition(
                        job_id, ["running"], "queued", f"preempted ({reason}): {how}"
                    )
                    continue
                # it ended on its own meanwhile: success or failure, as any other job
            why = error or "its process died without an exit status"
            # only the job's own failures spend its restarts: not a server restart, not a
            # preemption
            failures = sum(e.reason.startswith(_FAILED) for e in self.store.events(job_id))
            if code == 0:
                self.store.transition(job_id, ["running"], "succeeded", "finished")
            elif failures < job.max_restarts:
                self.store.transition(
                    job_id,
                    ["running"],
                    "restarting",
                    f"{_FAILED}{job.attempts} failed ({why}); restarting from its last "
                    f"checkpoint (restart {failures + 1} of {job.max_restarts})",
                )
            else:
                self.store.transition(job_id, ["running"], "failed", f"failed: {why}")

    def _launch(self, job: Job, expected: list[str], reason: str) -> None:
        """Start an attempt: claim the job in the store first, so it starts once only."""
        if not self.store.transition(
            job.id, expected, "running", reason, started=time.time(), attempts=job.attempts + 1
        ):
            return
        folder = self.folder(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SPEC).write_text(json.dumps(self._effective_spec(job)))
        (folder / EXIT).unlink(missing_ok=True)
        (folder / PREEMPT).unlink(missing_ok=True)
        try:
            with (folder / LOG).open("ab") as out:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "corral.service.job", str(folder)],
                    cwd=folder,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives a server restart; stopped as a group
                )
        except OSError as exc:
            self.store.transition(job.id, ["running"], "failed", f"cannot start: {exc}")
            return
        self.store.set_fields(job.id, pid=popen.pid)
        old = self._attempts.get(job.id)
        attempt = _Attempt(job.id, popen.pid, folder, popen)
        if old is not None:
            attempt.offsets = old.offsets
        else:
            offsets = folder / "offsets.json"
            if offsets.exists():
                attempt.offsets = json.loads(offsets.read_text())
        self._attempts[job.id] = attempt

    def _effective_spec(self, job: Job) -> dict[str, Any]:
        """The spec the attempt runs: on a Spark service, a Spark application of its own
        on the service's cluster, sized to what the scheduler gave it (``spark.cores.max``:
        without it, a standalone application takes every core, and the next job none)."""
        if self.spark is None:
            return job.spec
        conf = {
            **self.spark.conf,
            **job.spec.get("spark", {}).get("conf", {}),
            "spark.cores.max": str(max(1, math.ceil(job.demand.cpus))),
            "spark.dynamicAllocation.enabled": "false",
            "spark.app.name": f"corral-{job.name}-{job.id}",
        }
        return {**job.spec, "engine": "spark", "spark": {"master": self.spark.master, "conf": conf}}

    def _preempt(self, decision: Preempt) -> None:
        """Ask the job to stop at its next checkpoint; it is requeued once it has."""
        attempt = self._attempts.get(decision.job_id)
        if attempt is None or decision.job_id in self._preempting:
            return  # not ours, or already asked (each pass decides it again until it stops)
        (attempt.folder / PREEMPT).touch()
        deadline = time.monotonic() + self.preempt_grace_s
        self._preempting[decision.job_id] = (deadline, decision.reason)

    def _preempt_overdue(self) -> None:
        """Stop the preempted jobs that reached no checkpoint within the grace period."""
        for job_id, (deadline, _) in self._preempting.items():
            attempt = self._attempts.get(job_id)
            if attempt is not None and time.monotonic() > deadline:
                attempt.stop()

    # -- logs and metrics -------------------------------------------------------------

    def _pump(self) -> None:
        for attempt in self._attempts.values():
            self._pump_one(attempt)

    def _pump_one(self, attempt: _Attempt, *, final: bool = False) -> None:
        """Copy the lines added to the job's log and metrics files since last time: the
        complete ones, and once the attempt has ended (`final`) an unfinished last one."""
        changed = False
        for name in (LOG, METRICS):
            try:
                with (attempt.folder / name).open("rb") as f:
                    f.seek(attempt.offsets[name])
                    chunk = f.read()
            except OSError:
                continue
            end = len(chunk) if final else chunk.rfind(b"\n") + 1
            if end <= 0:
                continue
            lines = chunk[:end].decode(errors="replace").splitlines()
            attempt.offsets[name] += end
            changed = True
            if name == LOG:
                self.store.append_logs(attempt.job_id, lines)
            else:
                rows = []
                for line in lines:
                    with contextlib.suppress(ValueError):  # a line cut short by a kill
                        rows.append(json.loads(line))
                self.store.add_metrics(attempt.job_id, rows)
        if changed:
            (attempt.folder / "offsets.json").write_text(json.dumps(attempt.offsets))
