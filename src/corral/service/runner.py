"""Carries the scheduler's decisions out: starts, watches, stops and restarts job processes.

Every `tick` (twice a second) the runner
1. stops jobs whose cancel was requested (SIGTERM to the job's process group, SIGKILL
   after a grace period, well within 5 seconds);
2. reaps ended processes: success, failure, or a restart from the newest checkpoint,
   as `corral.train.restarts.decide` says, each recorded with its reason;
3. relaunches jobs in ``restarting``, which kept their resources;
4. asks the scheduler for a pass, and launches what it decides; a job it preempts is asked
   to stop at its next checkpoint (stopped anyway after a grace period), then requeued;
5. copies new log lines and metrics from the jobs' files into the store, with the files'
   offsets in the same transaction.

A job's ``max_restarts`` is spent once in all. Each attempt's launcher gets the budget
left and spends it on worker failures; the attempt's exit status says how many it spent,
recorded on the event that ends it. An attempt that reached its own verdict (a corral
error: bad data, a NaN loss, workers the launcher gave up on) is never restarted; one that
died otherwise is restarted while the budget allows, decided by the same function.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from corral.engines import forkserver
from corral.errors import CorralError
from corral.runtime import checkpoint as ckpt
from corral.runtime.resources import Resources
from corral.service import accounts, cgroups, isolation
from corral.service.cluster import cluster_state
from corral.service.isolation import Isolation
from corral.service.job import (
    CHECKPOINTS,
    EXIT,
    LOG,
    METRICS,
    PREEMPT,
    PREEMPTED,
    RESTARTS,
    SPEC,
    WORKER_PRELOAD,
    restarts_spent,
)
from corral.service.mlflow_auth import TeamAccess
from corral.service.scheduler import Launch, Policy, Preempt, schedule
from corral.service.store import Job, Store
from corral.spec import SparkSpec
from corral.train import restarts

log = logging.getLogger("corral.service")

#: What the runner's fork server imports: a job process's module (torch with it).
JOB_MODULES = ("corral.service.job",)

#: Seconds between SIGTERM and SIGKILL when a job is stopped.
STOP_GRACE_S = 3.0


@dataclass(frozen=True)
class ExitStatus:
    """How an attempt ended: its code and error, the restarts its launcher spent, and
    whether it reached its own verdict (`final`: a restart would meet it again)."""

    code: int
    error: str | None
    restarts: int = 0
    final: bool = False


class Attempt(Protocol):
    """What the runner watches of one attempt of a job: its process, or, in the runner's
    policy tests, a scripted stand-in (`tests/service/test_runner_policy.py`)."""

    job_id: str
    pid: int
    folder: Path
    #: How far the job's log and metrics files were copied to the store.
    offsets: dict[str, int]

    def alive(self) -> bool: ...

    def exit_status(self) -> ExitStatus | None: ...

    def stop(self) -> None: ...

    def exceeded(self) -> str | None:
        """Which enforced limit the attempt went past (the kernel stopped it), if any."""
        ...

    def release(self) -> None:
        """Free what the ended attempt held beside its process (its cgroups)."""
        ...


#: Starts an attempt of a job whose folder holds its spec; the runner's default runs
#: ``python -m corral.service.job FOLDER`` in a session of its own.
Starter = Callable[["Job", Path], Attempt]


@dataclass
class _Attempt:
    """A job process the runner watches: its own child, or one it re-attached to. Its
    offsets start where the store says the job's files were copied to."""

    job_id: str
    pid: int
    folder: Path
    popen: subprocess.Popen[bytes] | forkserver.ForkedProcess | None = None
    offsets: dict[str, int] = field(default_factory=lambda: {LOG: 0, METRICS: 0})
    #: Its enforced limits, with team accounts.
    cgroup: cgroups.Cgroup | None = None

    def exceeded(self) -> str | None:
        if self.cgroup is None or self.cgroup.oom_kills() == 0:
            return None
        return f"exceeded its {_mib(self.cgroup.memory_mib)} memory"

    def release(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove()

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _is_job_process(self.pid, self.folder)

    def exit_status(self) -> ExitStatus | None:
        """The attempt's exit status, from its exit file; from its exit code if it wrote
        none and is our child; None when nothing says how it ended."""
        try:
            status = json.loads((self.folder / EXIT).read_text())
        except (OSError, ValueError):
            if self.popen is not None and self.popen.returncode is not None:
                code = self.popen.returncode
                spent = restarts_spent(self.folder)  # what its launcher spent before
                return ExitStatus(code, f"its process ended with {_exit_code(code)}", spent)
            return None
        return ExitStatus(
            int(status["code"]),
            status.get("error"),
            int(status.get("restarts", 0)),
            bool(status.get("final", False)),
        )

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


def _mib(mib: int) -> str:
    """``2 GiB``, ``1.5 GiB``, or ``512 MiB``."""
    return f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib} MiB"


def _exit_code(code: int) -> str:
    """``exit code 3``, or ``SIGKILL`` for a process a signal ended."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit code {code}"


def _resumes(folder: Path) -> str:
    """Where a restarted attempt goes on from: the newest checkpoint, if the job saved one."""
    if ckpt.latest(folder / CHECKPOINTS) is None:
        return "from the start (no checkpoint yet)"
    return "from its last checkpoint"


def _is_job_process(pid: int, folder: Path) -> bool:
    """Whether `pid` is still the job process started on `folder` (not a reused pid):
    it runs in that folder (its command line may be a fork server's)."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat.rsplit(")", 1)[1].split()[0] == "Z"
    return not zombie and cwd == str(folder.resolve())


class ProcessStarter:
    """Starts an attempt as ``python -m corral.service.job FOLDER``, in a session of its
    own (it outlives a server restart and is stopped as a group), its output to the
    job's log. With team accounts (`Isolation.accounts`) it goes through
    `corral.service.sandbox`: inside the attempt's cgroup limits, as the team's account,
    in a clean environment, in a folder only that account may enter.

    With `mlflow` (an MLflow server with per-team permissions) the job gets its team's
    MLflow login, and no other: in its environment, or with team accounts in
    ``~/.mlflow/credentials`` of its HOME (its folder), which MLflow's client reads too.
    Not in the sandbox's environment: that travels on its command line, which every local
    user may read (``/proc/PID/cmdline``). Never in the spec or the log."""

    def __init__(
        self, isolation: Isolation, *, mlflow: TeamAccess | None = None, warm: bool = True
    ) -> None:
        self.isolation = isolation
        self.mlflow = mlflow
        #: In one-user mode, job processes are forks of a server that imported
        #: `corral.service.job` (torch with it): a job starts in milliseconds, not seconds.
        #: Spawned when the runner starts (`warm_up`), after the server forked its API
        #: processes, which so do not hold it.
        self.warm = warm and not isolation.accounts
        self.forks: forkserver.ForkServer | None = None

    def __call__(self, job: Job, folder: Path) -> Attempt:
        offsets = {LOG: job.log_offset, METRICS: job.metrics_offset}
        argv = [sys.executable, "-m", "corral.service.job", str(folder)]
        cgroup, env = None, None
        login = self._mlflow_login(job.team)
        with (folder / LOG).open("ab") as out:
            if self.isolation.accounts:
                account = accounts.ensure(job.team)
                if login is not None:
                    _write_mlflow_credentials(folder, login)
                isolation.give(folder, account.uid, account.gid)
                memory = job.demand.memory_mib
                cgroup = cgroups.create(
                    f"{job.id}-{job.attempts}", memory_mib=memory, cpus=job.demand.cpus
                )
                env = isolation.clean_env(folder)
                spec = {
                    "uid": account.uid,
                    "gid": account.gid,
                    "procs": [str(p) for p in cgroup.procs] if cgroup else [],
                    "rlimit_as": None if cgroup or not memory else memory * 2**20,
                    "env": env,
                    "cwd": str(folder),
                }
                argv = [sys.executable, "-m", "corral.service.sandbox", json.dumps(spec), "--"]
                argv += [sys.executable, "-m", "corral.service.job", str(folder)]
            elif login is not None:  # in place of the server's own (its admin's, say)
                env = {k: v for k, v in os.environ.items() if k not in login} | login
            env = dict(os.environ) if env is None else env
            popen: subprocess.Popen[bytes] | forkserver.ForkedProcess | None = None
            if self.warm:
                self.warm_up()
                assert self.forks is not None
                popen = forkserver.start(
                    argv, env, stdout=out.fileno(), cwd=str(folder), server=self.forks
                )
                if popen is None:  # it is gone: exec from now on
                    self.forks.close()
                    self.warm, self.forks = False, None
            if popen is None:
                popen = subprocess.Popen(
                    argv,
                    cwd=folder,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        return _Attempt(job.id, popen.pid, folder, popen, offsets, cgroup)

    def warm_up(self) -> None:
        """Spawn the fork server, if jobs are to be forks of one; it imports meanwhile
        (2–3 s), and a launch before it is done waits for it."""
        if self.warm and self.forks is None:
            self.forks = forkserver.ForkServer.spawn(JOB_MODULES, WORKER_PRELOAD)

    def close(self) -> None:
        """Stop the fork server (the jobs go on)."""
        if self.forks is not None:
            self.forks.close()
            self.forks = None

    def _mlflow_login(self, team: str) -> dict[str, str] | None:
        """The team's MLflow login, as variables; an `OSError` (the job cannot start) when
        MLflow refuses or does not answer."""
        if self.mlflow is None:
            return None
        try:
            return self.mlflow.team_login(team)
        except CorralError as exc:
            raise OSError(str(exc)) from None


def _write_mlflow_credentials(home: Path, login: dict[str, str]) -> None:
    """`login` as MLflow's client reads it from ``~/.mlflow/credentials``, 0600."""
    folder = home / ".mlflow"
    folder.mkdir(mode=0o700, exist_ok=True)
    lines = ["[mlflow]", *(f"{name.lower()} = {value}" for name, value in login.items())]
    fd = os.open(folder / "credentials", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")


class Runner:
    """Runs the service's jobs as local processes, in a folder per job under `state_dir`.

    `start_attempt` starts one attempt; the default runs the job's process, and the
    policy tests pass scripted attempts, so the decisions are tested without processes.
    """

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
        start_attempt: Starter | None = None,
        spark_teams: dict[str, dict[str, str]] | None = None,
        mlflow_uri: str | None = None,
    ) -> None:
        self.store, self.pool, self.policy = store, pool, policy or Policy()
        self.start_attempt = start_attempt or ProcessStarter(Isolation(accounts=False))
        self.spark = spark
        #: Per team, Spark settings its jobs get and cannot override: where a cluster can
        #: run an application as its team (a Kubernetes namespace and service account; a
        #: Kerberos principal and keytab on YARN), the team's.
        self.spark_teams = spark_teams or {}
        #: Every job is tracked on this MLflow store, in its team's experiment.
        self.mlflow_uri = mlflow_uri
        self.state_dir, self.interval = state_dir, interval
        self._attempts: dict[str, Attempt] = {}
        #: Jobs asked to stop at their next checkpoint: when to stop them anyway, and why.
        self._preempting: dict[str, tuple[float, str]] = {}
        self.preempt_grace_s = preempt_grace_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Passes completed: a sign of life, and what a caller waits on to know that the
        #: runner has seen a change (a pass that starts after it, ends after it).
        self.passes = 0

    def folder(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        if isinstance(self.start_attempt, ProcessStarter):
            self.start_attempt.warm_up()
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
        if isinstance(self.start_attempt, ProcessStarter):
            self.start_attempt.close()

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
            attempt = self._watch(job, job.pid or -1)
            if job.pid and attempt.alive():
                self._attempts[job.id] = attempt
                self.store.transition(
                    job.id, [job.state], job.state, "re-attached after the server restarted"
                )
                continue
            if attempt.exit_status() is not None:
                self._attempts[job.id] = attempt  # reaped by the next tick, as any other
                continue
            self.store.transition(
                job.id,
                ["running", "restarting"],
                "restarting",
                f"its process was gone after the server restarted; restarting {_resumes(folder)}",
            )

    def _watch(self, job: Job, pid: int) -> _Attempt:
        """A running process of `job` to re-attach to, copying its files from where the
        store says."""
        offsets = {LOG: job.log_offset, METRICS: job.metrics_offset}
        group = cgroups.of_process(pid, job.demand.memory_mib)  # its limits, if it has any
        return _Attempt(job.id, pid, self.folder(job.id), None, offsets, group)

    # -- one pass -------------------------------------------------------------------

    def tick(self) -> None:
        self._cancel_requested()
        self._preempt_overdue()
        self._over_limits()
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
        self.passes += 1

    def _cancel_requested(self) -> None:
        for job in self.store.jobs(states=["running", "restarting"]):
            if not job.cancel_requested:
                continue
            attempt = self._attempts.pop(job.id, None)
            self._preempting.pop(job.id, None)
            if attempt is not None:
                attempt.stop()
                self._pump_one(attempt, final=True)
                attempt.release()
            self.store.transition(job.id, [job.state], "cancelled", job.reason)

    def _over_limits(self) -> None:
        """Stop, and fail for good, the attempts that went past an enforced limit: a
        restart would only meet it again."""
        for job_id, attempt in list(self._attempts.items()):
            reason = attempt.exceeded()
            if reason is None:
                continue
            attempt.stop()
            self._pump_one(attempt, final=True)
            del self._attempts[job_id]
            self._preempting.pop(job_id, None)
            self.store.transition(job_id, ["running"], "failed", f"stopped: {reason}")
            attempt.release()

    def _reap(self) -> None:
        for job_id, attempt in list(self._attempts.items()):
            if attempt.alive():
                continue
            self._pump_one(attempt, final=True)
            del self._attempts[job_id]
            job = self.store.job(job_id)
            if job is None:
                continue
            reason = attempt.exceeded()
            attempt.release()
            if reason is not None:  # the kernel stopped it between two ticks
                self.store.transition(job_id, ["running"], "failed", f"stopped: {reason}")
                continue
            status = attempt.exit_status() or ExitStatus(
                1, "its process died without an exit status"
            )
            if job_id in self._preempting:
                deadline, reason = self._preempting.pop(job_id)
                stopped = time.monotonic() > deadline  # by `_preempt_overdue`
                if status.code == PREEMPTED or stopped:
                    how = (
                        status.error
                        if status.code == PREEMPTED
                        else "stopped before its next checkpoint"
                    )
                    self.store.transition(
                        job_id,
                        ["running"],
                        "queued",
                        f"preempted ({reason}): {how}",
                        spent=status.restarts,
                    )
                    continue
                # it ended on its own meanwhile: success or failure, as any other job
            if status.code == 0:
                self.store.transition(
                    job_id, ["running"], "succeeded", "finished", spent=status.restarts
                )
            else:
                self._judge(job, status)

    def _judge(self, job: Job, status: ExitStatus) -> None:
        """Restart a failed attempt, or fail the job, as the launcher's policy decides.

        Only the job's own failures spend its restarts (a server restart, a preemption do
        not), and those its launcher spent inside the attempt count too.
        """
        why = status.error or f"its process ended with {_exit_code(status.code)}"
        failure = restarts.Failure(
            role="job", rank=0, exc_type=None, detail=why, deterministic=status.final
        )
        spent = self.store.restarts_spent(job.id) + status.restarts
        decision = restarts.decide(failure, restarts_done=spent, max_restarts=job.max_restarts)
        if isinstance(decision, restarts.Restart):
            self.store.transition(
                job.id,
                ["running"],
                "restarting",
                f"attempt {job.attempts} failed ({why}); restart {decision.attempt} of "
                f"{job.max_restarts}, {_resumes(self.folder(job.id))}",
                spent=status.restarts + 1,
            )
            return
        # a verdict of the attempt itself is the job's error; else say why no restart
        reason = why if status.final else f"{why}; {decision.reason}"
        self.store.transition(job.id, ["running"], "failed", reason, spent=status.restarts)

    def _launch(self, job: Job, expected: list[str], reason: str) -> None:
        """Start an attempt: claim the job in the store first, so it starts once only. Its
        launcher may spend the restarts the job has left."""
        if not self.store.transition(
            job.id, expected, "running", reason, started=time.time(), attempts=job.attempts + 1
        ):
            return
        folder = self.folder(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        left = max(0, job.max_restarts - self.store.restarts_spent(job.id))
        spec = {**self._effective_spec(job), "max_restarts": left}
        (folder / SPEC).write_text(json.dumps(spec))
        (folder / EXIT).unlink(missing_ok=True)
        (folder / RESTARTS).unlink(missing_ok=True)
        (folder / PREEMPT).unlink(missing_ok=True)
        try:
            attempt = self.start_attempt(job, folder)
        except OSError as exc:
            self.store.transition(job.id, ["running"], "failed", f"cannot start: {exc}")
            return
        self.store.set_fields(job.id, pid=attempt.pid)
        self._attempts[job.id] = attempt

    def _effective_spec(self, job: Job) -> dict[str, Any]:
        """The spec the attempt runs: tracked in the service's MLflow store (when it has
        one), in an experiment named after the team; on a Spark service, a Spark
        application of its own
        on the service's cluster, with its team's settings, sized to what the scheduler
        gave it (``spark.cores.max``:
        without it, a standalone application takes every core, and the next job none)."""
        spec = job.spec
        if self.mlflow_uri is not None:  # the service's store, the team's experiment
            tracking = {**(spec.get("tracking") or {}), "kind": "mlflow"}
            tracking |= {"uri": self.mlflow_uri, "experiment": job.team}
            spec = {**spec, "tracking": tracking}
        if self.spark is None:
            return spec
        conf = {
            **self.spark.conf,
            **job.spec.get("spark", {}).get("conf", {}),
            **self.spark_teams.get(job.team, {}),  # the team's identity: not the job's to set
            "spark.cores.max": str(max(1, math.ceil(job.demand.cpus))),
            "spark.dynamicAllocation.enabled": "false",
            "spark.app.name": f"corral-{job.name}-{job.id}",
        }
        return {**spec, "engine": "spark", "spark": {"master": self.spark.master, "conf": conf}}

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

    def _pump_one(self, attempt: Attempt, *, final: bool = False) -> None:
        """Copy the lines added to the job's log and metrics files since last time: the
        complete ones, and once the attempt has ended (`final`) an unfinished last one.
        The store takes them and the new offsets in one transaction."""
        new: dict[str, list[str]] = {LOG: [], METRICS: []}
        offsets = dict(attempt.offsets)
        for name in (LOG, METRICS):
            try:
                with (attempt.folder / name).open("rb") as f:
                    f.seek(offsets[name])
                    chunk = f.read()
            except OSError:
                continue
            end = len(chunk) if final else chunk.rfind(b"\n") + 1
            if end > 0:
                new[name] = chunk[:end].decode(errors="replace").splitlines()
                offsets[name] += end
        if offsets == attempt.offsets:
            return
        rows = []
        for line in new[METRICS]:
            with contextlib.suppress(ValueError):  # a line cut short by a kill
                rows.append(json.loads(line))
        self.store.copy_output(
            attempt.job_id,
            new[LOG],
            rows,
            log_offset=offsets[LOG],
            metrics_offset=offsets[METRICS],
        )
        attempt.offsets = offsets
