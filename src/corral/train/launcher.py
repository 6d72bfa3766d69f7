"""`corral.run`: start N workers, watch them, return rank 0's result or the root failure.

The driver (this process) hosts the torch.distributed rendezvous store itself, on a port
the kernel picks, and tells workers to connect to it as clients
(``TORCHELASTIC_USE_AGENT_STORE``, as torchrun's agent does). No port is ever chosen and
then re-bound, so two jobs can never race for one. User code calling
``dist.init_process_group("gloo")`` with ``env://`` works unchanged.

Each attempt follows the same steps: host the store and the control channel (and, for a
strategy that asks, the job's membership: `corral.runtime.meetings`), write the payload,
launch the plan on the engine, then watch exits and messages until all workers finish or
one fails. On failure every worker is stopped, the root cause is picked (a signal beats
an exception, an exception beats the communication errors it causes in peers), and
`corral.train.restarts.decide` says whether to relaunch.

A job whose strategy trains on without a lost worker sets
`LaunchOptions.tolerate_worker_loss`, and helper roles may be `restartable`. Then a process
that dies (not of a deterministic error) need not end the attempt:
`corral.train.restarts.decide_loss` says whether a new worker, with a new rank, joins in
a lost one's place, or a helper starts again with its old rank; `LaunchOptions.on_lost`
tells the strategy (which releases whoever waits for the dead one), and the job's result
comes from the lowest surviving rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle
import torch.distributed as dist

from corral.comm.control import ControlServer, Message
from corral.comm.curve import JobKeys
from corral.engines import resolve
from corral.engines.base import Engine, Exit, Plan, ProcessSpec, WorkerGroup
from corral.engines.local import LocalEngine
from corral.errors import CorralError, LaunchError, SpecError, WorkerError
from corral.runtime import env as names
from corral.runtime.meetings import ADDRESS_KEY, MembershipHost
from corral.runtime.resources import ONE_CPU, Resources
from corral.runtime.roles import Role
from corral.train import restarts

if TYPE_CHECKING:
    from corral.spec import MLflow

log = logging.getLogger("corral")

#: After the first sign of failure, how long to wait for its root cause (the exit of a
#: killed worker, say) when only its echoes in peers have arrived. Failures still surface
#: well within 2 s.
_SETTLE_S = 1.0
#: How long a worker that exited cleanly may take to deliver its last messages.
_DRAIN_S = 5.0


@dataclass(kw_only=True)
class LaunchOptions:
    """How to run a job's workers; `corral.run` and `Trainer` both fill one in."""

    workers: int = 1
    resources: Resources = ONE_CPU
    max_restarts: int = 0
    master_port: int | None = None
    checkpoint_dir: Path | None = None
    keep_checkpoints: int = 3
    engine: Engine = field(default_factory=LocalEngine)
    on_report: Callable[[Message], None] | None = None
    #: Processes beside the workers (a strategy's parameter servers), each role's `fn`
    #: set: they are started with the workers and stopped when the workers are done.
    helpers: tuple[Role, ...] = ()
    #: Whether the strategy trains on without a lost worker (see `decide_loss`).
    tolerate_worker_loss: bool = False
    #: Called on the watching thread for every loss the attempt absorbs, with the driver's
    #: rendezvous store (where servers publish their addresses).
    on_lost: Callable[[ProcessLoss, dist.Store], None] | None = None
    #: Data for the workers that only some engines deliver (see `Plan.feed`).
    feed: Any = None
    #: Host the job's membership on the driver with these keys, for workers that meet
    #: without a process group (`StrategyPlan.membership`).
    membership: JobKeys | None = field(default=None, repr=False)

    def validate(self) -> None:
        if self.workers < 1:
            raise SpecError(f"workers: must be at least 1, got {self.workers}")
        if self.max_restarts < 0:
            raise SpecError(f"max_restarts: must be 0 or more, got {self.max_restarts}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise SpecError(f"master_port: must be between 1 and 65535, got {self.master_port}")


@dataclass(frozen=True, kw_only=True)
class ProcessLoss:
    """A process the job lost and went on without: `replaced_by` is the rank started in its
    place (a worker's successor; for a restarted helper, its own rank), if any."""

    role: str
    rank: int
    attempt: int
    failure: restarts.Failure
    replaced_by: int | None
    reason: str


@dataclass
class _Outcome:
    result: Any = None
    failure: restarts.Failure | None = None
    restarts_done: int = 0


def _python_path() -> str:
    """The caller's import path, so workers unpickle functions from the same modules."""
    entries = [os.path.abspath(p or os.getcwd()) for p in sys.path]
    return os.pathsep.join(dict.fromkeys(entries))


def _host_store(host: str, port: int | None) -> dist.TCPStore:
    try:
        return dist.TCPStore(
            host, port or 0, None, True, timeout=timedelta(minutes=5), wait_for_workers=False
        )
    except (RuntimeError, OSError) as exc:
        if port:
            raise LaunchError(
                f"master_port {port} on {host} is already in use; choose another port "
                "or leave master_port unset to let corral pick a free one"
            ) from exc
        raise LaunchError(f"cannot open a rendezvous port on {host}: {exc}") from exc


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM on the caller into SystemExit so `finally` blocks stop the workers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class _Processes:
    """Builds the `ProcessSpec` of any process of one attempt, joiners included."""

    opts: LaunchOptions
    payload: Path
    store_port: int
    control: ControlServer
    attempt: int

    def spec(self, role: str, rank: int, resources: Resources, **extra: str) -> ProcessSpec:
        # LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun sets them for one host; an engine that
        # places processes on several hosts numbers them per host instead, and shows each
        # the host's GPUs so that ``cuda:LOCAL_RANK`` is its own (see the engines).
        env = {
            "MASTER_ADDR": self.opts.engine.host,
            # the address this process serves on (PS shards, gossip mailboxes); an engine
            # that runs it on another machine replaces it with that machine's
            names.HOST: self.opts.engine.host,
            "MASTER_PORT": str(self.store_port),
            "WORLD_SIZE": str(self.opts.workers),
            "LOCAL_WORLD_SIZE": str(self.opts.workers),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            names.RESTART_COUNT: str(self.attempt),
            names.CONTROL: f"{self.control.address[0]}:{self.control.address[1]}",
            names.CONTROL_KEY: self.control.authkey.hex(),
            names.ROLE: role,
            names.KEEP_CHECKPOINTS: str(self.opts.keep_checkpoints),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "PYTHONPATH": _python_path(),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
        if self.opts.checkpoint_dir is not None:
            env[names.CHECKPOINT_DIR] = str(self.opts.checkpoint_dir)
        if self.opts.tolerate_worker_loss:
            env[names.ELASTIC] = "1"
        argv = [sys.executable, "-m", "corral.train.worker", str(self.payload)]
        return ProcessSpec(
            role=role,
            rank=rank,
            argv=argv,
            env=env,
            resources=resources,
            files=(str(self.payload),),
        )

    def plan(self) -> Plan:
        roles = [("worker", self.opts.workers, self.opts.resources)]
        roles += [(r.name, r.count, r.resources) for r in self.opts.helpers]
        return Plan(
            processes=[
                self.spec(name, rank, resources)
                for name, count, resources in roles
                for rank in range(count)
            ],
            feed=self.opts.feed,
        )

    def joiner(self, rank: int) -> ProcessSpec:
        return self.spec("worker", rank, self.opts.resources, **{names.JOINING: "1"})

    def restarted(self, role: str, rank: int) -> ProcessSpec:
        (resources,) = [r.resources for r in self.opts.helpers if r.name == role]
        return self.spec(role, rank, resources, **{names.RESTORE: "1"})


class _Watch:
    """Collects one attempt's messages and exits and turns them into an `_Outcome`."""

    def __init__(
        self,
        group: WorkerGroup,
        control: ControlServer,
        processes: _Processes,
        store: dist.Store,
        restarts_done: int,
    ) -> None:
        self.group, self.control, self.processes = group, control, processes
        self.opts, self.store = processes.opts, store
        self.errors: dict[tuple[str, int], Message] = {}
        self.closed: set[tuple[str, int]] = set()
        self.results: dict[int, Any] = {}
        self.first_trouble: float | None = None
        self.restarts_done = restarts_done
        self.absorbed: Counter[tuple[str, int]] = Counter()
        self.restartable = {r.name for r in self.opts.helpers if r.restartable}
        self.workers = processes.opts.workers  # grows as workers join

    def _take(self, msg: Message) -> None:
        body = msg.body
        if body is None:
            self.closed.add((msg.role, msg.rank))
        elif body["kind"] == "result":
            try:
                self.results[msg.rank] = cloudpickle.loads(body["value"])
            except Exception as exc:
                raise CorralError(
                    f"the return value of worker {msg.rank} cannot be unpickled by the "
                    f"caller: {exc}"
                ) from exc
        elif body["kind"] == "error":
            self.errors.setdefault((msg.role, msg.rank), msg)
            if self._fails_attempt(msg):
                self.first_trouble = self.first_trouble or msg.received
        elif body["kind"] == "report" and self.opts.on_report is not None:
            self.opts.on_report(msg)

    def _drain(self, timeout: float) -> None:
        try:
            self._take(self.control.messages.get(timeout=timeout))
            while True:
                self._take(self.control.messages.get_nowait())
        except queue.Empty:
            pass

    def run(self) -> _Outcome:
        while True:
            self._drain(0.05)
            exits = self.group.poll()
            bad = self._new_failures(exits)
            if bad and self._absorb(bad, exits):
                continue
            if bad and self.first_trouble is None:
                self.first_trouble = time.monotonic()
            if self.first_trouble is not None:
                closed = all((e.role, e.rank) in self.closed for e in bad)
                settled = self._has_root_cause(bad) and closed
                if settled or time.monotonic() - self.first_trouble > _SETTLE_S:
                    return self._outcome(failure=self._root_cause(bad))
            elif sum(e.role == "worker" for e in exits) == self.workers:
                return self._finish(exits)  # helpers (servers) are stopped, not awaited

    def _fails_attempt(self, msg: Message) -> bool:
        """Whether an error message alone fails the attempt, before its sender's exit.

        A job that tolerates losing workers waits for the exit instead, and then decides.
        """
        body = msg.body or {}
        return body["deterministic"] or not self._tolerated(msg.role)

    def _tolerated(self, role: str) -> bool:
        if role == "worker":
            return self.opts.tolerate_worker_loss
        return role in self.restartable

    def _outcome(self, **kw: Any) -> _Outcome:
        return _Outcome(restarts_done=self.restarts_done, **kw)

    def _new_failures(self, exits: list[Exit]) -> list[Exit]:
        """Failed exits not yet absorbed (a restarted helper reuses its role and rank)."""
        seen: Counter[tuple[str, int]] = Counter()
        bad = []
        for e in exits:
            if e.returncode != 0:
                seen[e.role, e.rank] += 1
                if seen[e.role, e.rank] > self.absorbed[e.role, e.rank]:
                    bad.append(e)
        return bad

    def _absorb(self, bad: list[Exit], exits: list[Exit]) -> bool:
        """Go on without (or with replacements for) the processes in `bad` if the policy
        allows every one of them; False to fail the attempt."""
        self._drain(0.05)  # the error a dying worker sent arrives before its exit is seen
        running = self.workers - len({e.rank for e in exits if e.role == "worker"})
        decisions = []
        for e in bad:
            failure = self._failure_of(e)
            decision = restarts.decide_loss(
                failure,
                tolerated=self._tolerated(e.role),
                survivors=running,
                restarts_done=self.restarts_done,
                max_restarts=self.opts.max_restarts,
                can_add=self.group.can_add,
            )
            if decision is None:
                return False
            decisions.append((e, failure, decision))
        for e, failure, decision in decisions:
            self.absorbed[e.role, e.rank] += 1
            self.errors.pop((e.role, e.rank), None)
            successor = None
            if isinstance(decision, restarts.Continue):
                reason = decision.reason
            elif e.role == "worker":
                self.restarts_done, successor = decision.restarts_done, self.workers
                self.group.add(self.processes.joiner(successor))
                self.workers += 1
                reason = f"worker {successor} joins in its place"
            else:
                self.restarts_done, successor = decision.restarts_done, e.rank
                self.group.add(self.processes.restarted(e.role, e.rank))
                reason = f"{e.role} {e.rank} restarts and restores its state"
            if not isinstance(decision, restarts.Continue):
                _report_restart(self.opts, failure, self.restarts_done)
            loss = ProcessLoss(
                role=e.role,
                rank=e.rank,
                attempt=self.processes.attempt,
                failure=failure,
                replaced_by=successor,
                reason=reason,
            )
            if self.opts.on_lost is not None:
                self.opts.on_lost(loss, self.store)
        return True

    def _failure_of(self, e: Exit) -> restarts.Failure:
        msg = self.errors.get((e.role, e.rank))
        if msg is None or e.signal_name:
            return self._from_exit(e)
        return self._from_message(msg)

    def _finish(self, exits: list[Exit]) -> _Outcome:
        """All workers are done: wait for their last messages, return the lowest rank's."""
        clean = {("worker", e.rank) for e in exits if e.role == "worker" and e.returncode == 0}
        deadline = time.monotonic() + _DRAIN_S
        while not clean <= self.closed and time.monotonic() < deadline:
            self._drain(0.05)
        if not self.results:
            rank = min((rank for _, rank in clean), default=0)
            return self._outcome(
                failure=restarts.Failure(
                    role="worker",
                    rank=rank,
                    exc_type=None,
                    detail="finished but its result never reached the driver",
                )
            )
        return self._outcome(result=self.results[min(self.results)])

    def _has_root_cause(self, bad: list[Exit]) -> bool:
        """Whether something besides echoes of a peer's failure has been seen."""
        echoes = {key for key, m in self.errors.items() if m.body and m.body["secondary"]}
        return any((e.role, e.rank) not in echoes for e in bad) or len(self.errors) > len(echoes)

    def _root_cause(self, bad: list[Exit]) -> restarts.Failure:
        """A signal first, then a primary exception, then errors that only echo a peer's."""
        candidates: list[tuple[int, float, restarts.Failure]] = []
        for e in bad:
            if e.signal_name:
                candidates.append((0, 0.0, self._from_exit(e)))
            elif (e.role, e.rank) not in self.errors:
                candidates.append((1, 0.0, self._from_exit(e)))
        for msg in self.errors.values():
            body = msg.body or {}
            priority = 2 if body["secondary"] else 1
            candidates.append((priority, body["time"], self._from_message(msg)))
        candidates.sort(key=lambda c: (c[0], c[1]))
        return candidates[0][2]

    @staticmethod
    def _from_message(msg: Message) -> restarts.Failure:
        body = msg.body or {}
        return restarts.Failure(
            role=msg.role,
            rank=msg.rank,
            exc_type=body["type"],
            detail=body["message"],
            traceback=body["traceback"],
            deterministic=body["deterministic"],
        )

    def _from_exit(self, e: Exit) -> restarts.Failure:
        tail = "\n".join(self.group.logs(e.role, e.rank).splitlines()[-20:])
        return restarts.Failure(
            role=e.role,
            rank=e.rank,
            exc_type=None,
            detail=e.how(),
            traceback=tail,
        )


def _report_restart(opts: LaunchOptions, failure: restarts.Failure, restarts_done: int) -> None:
    """Tell the caller a restart was spent, as it happens (as a report of the driver's):
    a caller that itself may die, such as a service job's process, records the count."""
    if opts.on_report is not None:
        metrics = {
            "kind": "restart",
            "restarts": restarts_done,
            "max_restarts": opts.max_restarts,
            "cause": f"{failure.role} {failure.rank}: {failure.exc_type or failure.detail}",
        }
        body = {"kind": "report", "time": time.time(), "metrics": metrics}
        opts.on_report(Message(role="driver", rank=0, body=body))


def _attempt(payload: Path, opts: LaunchOptions, attempt: int, restarts_done: int) -> _Outcome:
    store = _host_store(opts.engine.host, opts.master_port)
    control = ControlServer(opts.engine.host)
    group: WorkerGroup | None = None
    members = None
    if opts.membership is not None:  # fresh each attempt, as the workers are
        members = MembershipHost(opts.membership, opts.engine.host, opts.workers)
        store.set(ADDRESS_KEY, members.address)
    try:
        processes = _Processes(opts, payload, store.port, control, attempt)
        group = opts.engine.launch(processes.plan())
        return _Watch(group, control, processes, store, restarts_done).run()
    finally:
        if group is not None:
            group.stop()
        control.close()
        if members is not None:
            members.close()


def launch(fn: Callable[..., Any], args: tuple[Any, ...], opts: LaunchOptions) -> Any:
    """Run ``fn(*args)`` on every worker; return rank 0's value or raise `WorkerError`."""
    opts.validate()
    run_dir = Path(tempfile.mkdtemp(prefix="corral-"))
    try:
        payload = run_dir / "payload.pkl"
        entries = {"worker": (fn, args)} | {r.name: (r.fn, r.args) for r in opts.helpers}
        payload.write_bytes(cloudpickle.dumps(entries))
        if opts.checkpoint_dir is None:  # restarts within this call still find them
            opts = dataclasses.replace(opts, checkpoint_dir=run_dir / "checkpoints")
        restarts_done = attempt = 0
        with _sigterm_as_exit():
            while True:
                outcome = _attempt(payload, opts, attempt, restarts_done)
                if outcome.failure is None:
                    return outcome.result
                f, restarts_done = outcome.failure, outcome.restarts_done
                decision = restarts.decide(
                    f, restarts_done=restarts_done, max_restarts=opts.max_restarts
                )
                if isinstance(decision, restarts.GiveUp):
                    raise WorkerError(
                        role=f.role,
                        rank=f.rank,
                        exc_type=f.exc_type,
                        detail=f.detail,
                        remote_traceback=f.traceback,
                        restarts=restarts_done,
                    )
                log.warning(
                    "%s %d failed (%s); restarting all workers, attempt %d of %d",
                    f.role,
                    f.rank,
                    f.exc_type or f.detail,
                    decision.attempt + 1,
                    opts.max_restarts + 1,
                )
                restarts_done, attempt = decision.attempt, attempt + 1
                _report_restart(opts, f, restarts_done)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run(
    fn: Callable[..., Any],
    *args: Any,
    workers: int = 1,
    cpus_per_worker: int = 1,
    gpus_per_worker: int = 0,
    max_restarts: int = 0,
    master_port: int | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    engine: Engine | str | None = None,
    tracking: MLflow | str | None = None,
) -> Any:
    """Run your own torch.distributed function on `workers` processes; return rank 0's value.

    With `tracking` (``"mlflow"`` or `corral.MLflow`), the call is one MLflow run: the
    function and these options as params, and what rank 0 reports with
    ``corral.context().report(...)`` as metrics, at the ``step`` (or ``epoch``) a report
    names, else at the next step.

    Every worker gets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK`` and
    ``WORLD_SIZE``, so code written for torchrun runs unchanged. Pass keyword arguments for
    `fn` with `functools.partial`.

    Example:
        >>> def train(lr):
        ...     dist.init_process_group("gloo")
        ...     ...
        ...     return dist.get_rank()
        >>> corral.run(train, 0.1, workers=4)
        0

    Raises:
        WorkerError: a worker raised, exited non-zero or was killed, and no restart was
            left; names the rank and carries the worker's traceback.
        LaunchError: the workers could not be started.
    """
    opts = LaunchOptions(
        workers=workers,
        resources=Resources(cpus=cpus_per_worker, gpus=gpus_per_worker),
        max_restarts=max_restarts,
        master_port=master_port,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
        engine=resolve(engine),
    )
    if tracking is None:
        return launch(fn, args, opts)
    from corral.spec import TrainSettings
    from corral.train.tracking import Tracker, tracked

    spec = TrainSettings(tracking=tracking).tracking  # "mlflow" stands for its defaults
    assert spec is not None
    params = {
        "function": getattr(fn, "__qualname__", type(fn).__name__),
        "args": repr(args)[:6000],
        "workers": str(workers),
        "cpus_per_worker": str(cpus_per_worker),
        "gpus_per_worker": str(gpus_per_worker),
        "max_restarts": str(max_restarts),
    }
    engine_name = type(opts.engine).__name__.removesuffix("Engine").lower()
    tags = {"corral.workers": str(workers), "corral.engine": engine_name}
    tracker = Tracker(spec, params=params, tags=tags)
    opts = dataclasses.replace(opts, on_report=tracked(tracker, opts.on_report))
    ok = False
    try:
        value = launch(fn, args, opts)
        ok = True
        return value
    finally:
        tracker.finish(ok=ok)
