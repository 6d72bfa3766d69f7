"""Spark as corral's cluster engine: every process of a plan is one task of a barrier stage.

`SparkEngine.launch` runs a single barrier stage of as many tasks as the plan has
processes (workers, and servers beside them). Spark starts them all at once or not at all,
which is what gang-scheduled training needs. Task ``i`` takes process ``i`` of the plan by
its partition id (from ``BarrierTaskContext``), not by any port or host guessed on the
driver. It runs the process with the local engine, on the executor, so the guarantees of
`corral.engines.local` hold there too: the process runs in its own process group, has
no orphans when its task is killed, and prefixes its log lines ``[worker 3]``.

Each task reports its process's exit (code, and the tail of its log) to the driver over
an authenticated control connection the moment it happens, so the launcher sees a failed
rank within seconds instead of when the stage ends. Stopping the group releases every task
over that channel: each stops its process and ends normally, so a job that succeeded
leaves no killed tasks in Spark's log (cancelling the stage logs each one as a lost task).
Only a task that does not end then is cancelled, with the stage's job group.

Processes are numbered per host, as torchrun numbers them: each task learns where the
stage's other tasks run and which GPUs Spark gave them (one ``allGather`` at its start),
and its process gets ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` among its role's processes on
its host, and sees all of their GPUs there, in rank order, as on the local engine.

A worker fed a DataFrame finds its partition through `SPILL_ENV` and `ROWS_FROM_ENV`, the
engine's half of a contract the data layer (`corral.data.spill`) reads: the engine knows no
training data, only how to hand a partition's Arrow batches to the process on its executor.

Without a SparkSession, the engine starts one in local mode, sized to the job: as many
cores as its processes ask CPUs, and at least one per process.

Before submitting, the engine checks what a barrier stage would otherwise wait on for
minutes: that the cluster has a task slot for every process, and that dynamic allocation
(which barrier mode refuses) is off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import json
import logging
import math
import os
import queue
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Client
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.comm.control import ControlClient, ControlServer
from corral.engines.base import Engine, Exit, Plan, ProcessSpec, WorkerGroup
from corral.engines.local import LOG_LINES_KEPT, LocalEngine, device_sets, to_stderr
from corral.errors import LaunchError, SpecError
from corral.runtime import env as names
from corral.runtime.resources import Resources

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

log = logging.getLogger("corral")

#: Lines of a process's log sent back with its exit, for error reports.
_LOG_TAIL = 200
#: How long to wait for a first executor to register (a cluster just started has none).
_SLOTS_WAIT_S = 30.0
#: How long released tasks may take to end, beyond the grace of their processes, before
#: the stage is cancelled.
_RELEASE_S = 10.0

#: Environment variables a worker fed a DataFrame partition gets: the Arrow IPC file its
#: task spilled the partition to, and a FIFO that gives, once every partition is spilled,
#: their row counts, comma-separated, in rank order.
SPILL_ENV, ROWS_FROM_ENV = "CORRAL_SPILL", "CORRAL_PARTITION_ROWS_FROM"
#: Beside the spill file, in a file of this suffix: the row count of each of its blocks.
BLOCKS_SUFFIX = ".blocks"


class _Channel(ControlServer):
    """The group's control channel: tasks send their processes' log lines and exits on
    it, and the group releases them through it when it stops."""

    def release(self) -> None:
        """Tell every task connected so far to stop its process and end."""
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.send("release")


def _stop_when_released(
    address: tuple[str, int], authkey: bytes, running: WorkerGroup
) -> Callable[[], None]:
    """Inside a task: stop `running` once the driver releases the task (`_Channel.release`)
    or goes away; returns what ends the watch when the process ended by itself."""
    conn = Client(address, authkey=authkey)
    ended = threading.Event()

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            while not ended.is_set():
                if conn.poll(0.2):
                    conn.recv()
                    break
        if not ended.is_set():
            running.stop()

    thread = threading.Thread(target=watch, name="corral-release", daemon=True)
    thread.start()

    def end() -> None:
        ended.set()
        thread.join()
        conn.close()

    return end


def per_host_env(
    specs: list[ProcessSpec], placed: list[tuple[str, list[str]]]
) -> list[dict[str, str]]:
    """What each process of a stage is told of its place on its host, from where every
    task of the stage runs: its host, and the GPUs Spark gave it (`placed[i]` for
    `specs[i]`).

    The launcher numbers processes as for one host; torchrun numbers them per host, and
    code written for it picks its GPU with ``cuda:LOCAL_RANK``. So ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE`` count the processes of the same role on the same host, in rank
    order, and a process with GPUs sees all of theirs (`device_sets`), its own first one
    at index ``CORRAL_DEVICE``. A process without GPUs is told nothing of devices.
    """
    on_host: dict[str, list[int]] = {}
    for i, (host, _) in enumerate(placed):
        on_host.setdefault(host, []).append(i)
    envs: list[dict[str, str]] = [{} for _ in specs]
    for tasks in on_host.values():
        visible = device_sets([specs[i] for i in tasks], [placed[i][1] for i in tasks])
        for i, seen in zip(tasks, visible, strict=True):
            role = specs[i].role
            peers = sorted(specs[j].rank for j in tasks if specs[j].role == role)
            env = {
                "LOCAL_RANK": str(peers.index(specs[i].rank)),
                "LOCAL_WORLD_SIZE": str(len(peers)),
            }
            if seen:
                env |= {
                    "CUDA_VISIBLE_DEVICES": ",".join(seen),
                    names.DEVICE: str(seen.index(placed[i][1][0])),
                }
            envs[i] = env
    return envs


def _placement(specs: list[ProcessSpec]) -> dict[str, str]:
    """Inside a task: the address its process serves on (its executor's, not the
    driver's), and its place among the stage's processes on this host (`per_host_env`),
    learnt from every task of the stage with one ``allGather``."""
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    me = ctx.partitionId()
    hosts = [t.address.rsplit(":", 1)[0] for t in ctx.getTaskInfos()]
    given = ctx.resources().get("gpu")  # the executor's GPUs Spark gave this task
    own = list(given.addresses) if specs[me].resources.gpus and given is not None else []
    every = [json.loads(gpus) for gpus in ctx.allGather(json.dumps(own))]
    return {names.HOST: hosts[me], **per_host_env(specs, list(zip(hosts, every, strict=True)))[me]}


def _run_process(
    specs: list[ProcessSpec],
    folder: str,
    files: Any,
    exits_at: tuple[str, int],
    exits_key: bytes,
    env: dict[str, str] | None = None,
    meanwhile: Callable[[WorkerGroup], None] | None = None,
) -> int:
    """Inside a task: run process number `partitionId` of the stage's `specs`, with `env`
    beside its own, with the local engine on this executor, its output lines streamed to
    the driver as they come, and report its exit there.

    `files` (a broadcast of the driver's files the spec names) are written to `folder`,
    and the process learns its place on this executor's host (`_placement`). `meanwhile`
    runs once the process has started (a fed task spills its partition then, while the
    worker imports and meets its peers); if it fails, the process is stopped.
    """
    from pyspark import BarrierTaskContext

    spec = specs[BarrierTaskContext.get().partitionId()]
    placement = _placement(specs)
    argv = [sys.executable, *spec.argv[1:]]  # on a cluster, the driver's path may not exist
    for i, original in enumerate(spec.files):
        local = os.path.join(folder, f"file-{i}-{os.path.basename(original)}")
        with open(local, "wb") as out:
            out.write(files.value[original])
        argv = [local if a == original else a for a in argv]
    spec = dataclasses.replace(spec, argv=argv, env={**spec.env, **(env or {}), **placement})
    client = ControlClient(exits_at, exits_key, spec.role, spec.rank)
    try:
        group = LocalEngine(sink=lambda line: client.send({"kind": "log", "line": line}))
        running = group.launch(Plan(processes=[spec]))
        unwatch = _stop_when_released(exits_at, exits_key, running)
        try:
            if meanwhile is not None:
                meanwhile(running)
            (end,) = running.wait()
        finally:
            unwatch()
            running.stop()
        # after stop, which has read the process's output to its end (wait has not)
        tail = "\n".join(running.logs(spec.role, spec.rank).splitlines()[-_LOG_TAIL:])
        client.send({"kind": "exit", "returncode": end.returncode, "logs": tail})
    finally:
        client.close()
    return end.returncode


def _task(
    specs: list[ProcessSpec], files: Any, exits_at: tuple[str, int], exits_key: bytes
) -> Callable[[Iterable[int]], Iterable[int]]:
    """What every task of a plain barrier stage runs: process number `partitionId`."""

    def run(_: Iterable[int]) -> Iterator[int]:
        with tempfile.TemporaryDirectory(prefix="corral-task-", dir=_scratch()) as folder:
            yield _run_process(specs, folder, files, exits_at, exits_key)

    return run


def _scratch() -> str | None:
    """The executor's scratch space (spark.local.dir), where Spark spills its own data."""
    return os.environ.get("SPARK_LOCAL_DIRS", "").split(",")[0] or None


def _spill(batches: Iterable[Any], schema: Any, path: str, buffer_bytes: int) -> int:
    """Write record batches to an Arrow IPC file in blocks of at most `buffer_bytes`, and
    the blocks' row counts beside it (`BLOCKS_SUFFIX`); returns the rows written.

    Memory holds one incoming batch; a worker later decodes one block at a time.
    """
    import pyarrow as pa

    rows, blocks = 0, []
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            if not batch.num_rows:
                continue
            per_block = max(1, int(buffer_bytes * batch.num_rows / max(1, batch.nbytes)))
            for start in range(0, batch.num_rows, per_block):
                block = batch.slice(start, per_block)
                writer.write_batch(block)
                blocks.append(block.num_rows)
            rows += batch.num_rows
    with open(path + BLOCKS_SUFFIX, "w") as out:
        out.write(",".join(map(str, blocks)))
    return rows


def _tell(fifo: str, text: str, running: WorkerGroup) -> None:
    """Write `text` to the worker reading `fifo`, once it opens it; nothing if the worker
    ended first (it failed, and reports that itself)."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            if running.poll():
                return
            time.sleep(0.05)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _fed_task(
    specs: list[ProcessSpec],
    files: Any,
    schema: Any,
    buffer_bytes: int,
    exits_at: tuple[str, int],
    exits_key: bytes,
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """What a worker task fed by a DataFrame runs: start worker number `partitionId`, and
    while it starts, spill its partition and learn every partition's size
    (``allGather``), which it then reads from a FIFO before its first step."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        with tempfile.TemporaryDirectory(prefix="corral-task-", dir=_scratch()) as folder:
            path, fifo = os.path.join(folder, "partition.arrow"), os.path.join(folder, "rows")
            os.mkfifo(fifo)

            def spill(running: WorkerGroup) -> None:
                counts = ctx.allGather(str(_spill(batches, schema, path, buffer_bytes)))
                _tell(fifo, ",".join(counts), running)

            env = {SPILL_ENV: path, ROWS_FROM_ENV: fifo}
            code = _run_process(specs, folder, files, exits_at, exits_key, env, spill)
        # typed as the stage declares it ("returncode int"): an int64 or null column
        # here fails the stage in Spark's reader (ArrowColumnVector.getInt)
        yield pa.RecordBatch.from_arrays([pa.array([code], pa.int32())], names=["returncode"])

    return run


def task_slots(sc: SparkContext, profile: Any = None) -> int:
    """Tasks the cluster can run at once with `profile` (default: the application's)."""
    jsc = sc._jsc.sc()  # type: ignore[union-attr]
    if profile is None:
        return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))
    return int(jsc.maxNumConcurrentTasks(profile._java_resource_profile))


def _default_task(sc: SparkContext) -> Resources:
    """What every task gets unless a stage asks otherwise (``spark.task.*``)."""
    conf = sc.getConf()
    gpus = float(conf.get("spark.task.resource.gpu.amount", "0") or 0)
    return Resources(cpus=int(conf.get("spark.task.cpus", "1") or 1), gpus=int(gpus))


def _profile(sc: SparkContext, resources: Resources) -> Any:
    """A stage-level task profile asking `resources`' CPUs and GPUs of each task, or
    ``None`` where the application's defaults already give them.

    Local mode schedules no task resources: there a process's CPUs are only pinned by the
    process itself (as on the local engine), and GPUs cannot be handed out at all.
    """
    default = _default_task(sc)
    if (resources.cpus, resources.gpus) == (default.cpus, default.gpus):
        return None
    if (sc.master or "").startswith("local"):
        if resources.gpus:
            raise LaunchError("Spark's local mode cannot hand GPUs to tasks; try engine='local'")
        return None
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    requests = TaskResourceRequests().cpus(math.ceil(resources.cpus))
    if resources.gpus:
        requests = requests.resource("gpu", resources.gpus)
    profile = ResourceProfileBuilder().require(requests).build
    sc._jsc.sc().resourceProfileManager().addResourceProfile(  # type: ignore[union-attr]
        profile._java_resource_profile
    )
    return profile


@dataclasses.dataclass(frozen=True)
class _Stage:
    """Processes that run as one barrier stage: same resources, so one task profile."""

    specs: list[ProcessSpec]
    resources: Resources
    #: Whether these are the workers, fed the plan's DataFrame partitions.
    fed: bool
    #: The stage-level task profile (`_profile`); ``None`` for the defaults.
    profile: Any

    def describe(self) -> str:
        roles = dict.fromkeys(p.role for p in self.specs)
        return ", ".join(f"{sum(p.role == r for p in self.specs)} {r}" for r in roles)


def _stages(sc: SparkContext, plan: Plan) -> list[_Stage]:
    """The plan's processes grouped into barrier stages: the fed workers by themselves,
    and the rest by the resources each asks."""
    groups: dict[tuple[bool, Resources], list[ProcessSpec]] = {}
    for p in plan.processes:
        fed = plan.feed is not None and p.role == "worker"
        groups.setdefault((fed, p.resources), []).append(p)
    return [
        _Stage(specs=specs, resources=res, fed=fed, profile=_profile(sc, res))
        for (fed, res), specs in groups.items()
    ]


def _check_slots(sc: SparkContext, stages: list[_Stage]) -> None:
    """Refuse a plan the cluster cannot run all at once, which a barrier stage would
    otherwise wait on for minutes before failing."""
    deadline = time.monotonic() + _SLOTS_WAIT_S
    slots = task_slots(sc)
    while slots == 0 and time.monotonic() < deadline:  # no executor has registered yet
        time.sleep(0.5)
        slots = task_slots(sc)
    default = _default_task(sc)
    for stage in stages:
        if stage.profile is None:
            continue
        fit = task_slots(sc, stage.profile)
        if fit < len(stage.specs):
            raise LaunchError(
                f"{stage.describe()} tasks need {stage.resources.cpus:g} CPU(s) and "
                f"{stage.resources.gpus} GPU(s) each; Spark fits {fit} at once"
            )
    everything = _Stage(
        specs=[p for s in stages for p in s.specs], resources=default, fed=False, profile=None
    )
    cpus = sum(len(s.specs) * (s.resources.cpus if s.profile else default.cpus) for s in stages)
    if cpus > slots * default.cpus:
        wanted = cpus // default.cpus
        raise LaunchError(
            f"the job needs {wanted} task slots at once ({everything.describe()}); "
            f"Spark has {slots}: add cores"
        )


class SparkWorkerGroup(WorkerGroup):
    """The processes of one plan, running as the tasks of Spark barrier stages: one stage
    for all of them, or, when the workers are fed a DataFrame, one for the workers (over
    its partitions) and one beside it for the other roles."""

    def __init__(
        self, sc: SparkContext, plan: Plan, stages: list[_Stage], host: str, buffer_bytes: int
    ) -> None:
        self._sc, self._plan, self._buffer_bytes = sc, plan, buffer_bytes
        self._job_group = f"corral-{uuid.uuid4().hex[:12]}"
        self._channel = _Channel(host)
        self._exits: dict[tuple[str, int], Exit] = {}
        self._logs: dict[tuple[str, int], str] = {}  # the tail each exit carried
        self._live: dict[tuple[str, int], deque[str]] = {}  # lines streamed so far
        self._failure: str | None = None
        # the driver's files the processes read (the job's payload), shipped once to each
        # executor rather than read from a path that exists only on the driver
        shipped = {f: Path(f).read_bytes() for p in plan.processes for f in p.files}
        self._files = sc.broadcast(shipped)
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(self._fed(plan.feed, stage) if stage.fed else self._plain(stage),),
                name=self._job_group,
                daemon=True,
            )
            for stage in stages
        ]
        for thread in self._threads:
            thread.start()

    def _plain(self, stage: _Stage) -> Callable[[], Any]:
        n, at, key = len(stage.specs), self._channel.address, self._channel.authkey
        task = _task(stage.specs, self._files, at, key)
        rdd = self._sc.parallelize(range(n), n).barrier().mapPartitions(task)
        if stage.profile is not None:
            rdd = rdd.withResources(stage.profile)
        return rdd.collect

    def _fed(self, df: Any, stage: _Stage) -> Callable[[], Any]:
        from pyspark.sql.pandas.types import to_arrow_schema

        schema = to_arrow_schema(df.schema)
        at, key = self._channel.address, self._channel.authkey
        task = _fed_task(stage.specs, self._files, schema, self._buffer_bytes, at, key)
        # as it is when it already has one partition per worker: no shuffle (barrier mode
        # refuses a coalesced RDD, so any other count is repartitioned)
        n, wanted = df.rdd.getNumPartitions(), len(stage.specs)
        parts = df if n == wanted else df.repartition(wanted)
        return parts.mapInArrow(task, "returncode int", barrier=True, profile=stage.profile).collect

    def _run(self, stage: Callable[[], Any]) -> None:
        self._sc.setJobGroup(self._job_group, "corral training job", interruptOnCancel=True)
        try:
            stage()
        except Exception as exc:  # cancelled by stop(), or the stage failed in Spark itself
            text = str(exc).strip()
            self._failure = self._failure or (text.splitlines()[0] if text else repr(exc))

    @property
    def _running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def poll(self) -> list[Exit]:
        while True:
            try:
                msg = self._channel.messages.get_nowait()
            except queue.Empty:
                break
            if msg.body is not None and msg.body.get("kind") == "log":
                line = msg.body["line"]
                to_stderr(line)
                kept = self._live.setdefault((msg.role, msg.rank), deque(maxlen=LOG_LINES_KEPT))
                kept.append(line.removeprefix(f"[{msg.role} {msg.rank}] "))
            elif msg.body is not None and msg.body.get("kind") == "exit":
                key = (msg.role, msg.rank)
                self._exits[key] = Exit(
                    role=msg.role, rank=msg.rank, returncode=msg.body["returncode"]
                )
                self._logs[key] = msg.body["logs"]
        if not self._running and self._failure is not None:
            # the stage died without our tasks reporting (an executor lost, say)
            for p in self._plan.processes:
                if (p.role, p.rank) not in self._exits:
                    self._exits[p.role, p.rank] = Exit(role=p.role, rank=p.rank, returncode=1)
                    self._logs[p.role, p.rank] = f"the Spark stage failed: {self._failure}"
        return list(self._exits.values())

    def wait(self, timeout: float | None = None) -> list[Exit]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.poll()) < len(self._plan.processes):
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return self.poll()

    def stop(self, grace: float = 1.0) -> None:
        """Release every task, which stops its process and ends; cancel the stage only if
        some task does not end then (Spark interrupts it, and its process group dies)."""
        if self._running:
            self._channel.release()
            self._join(grace + _RELEASE_S)
        if self._running:
            self._sc.cancelJobGroup(self._job_group)
            self._join(grace + 30.0)
        self._channel.close()
        self._files.unpersist(blocking=False)

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def logs(self, role: str, rank: int) -> str:
        """What the process printed: the tail its exit carried, or while it runs, the
        lines streamed so far."""
        self.poll()
        if (role, rank) in self._logs:
            return self._logs[role, rank]
        return "\n".join(self._live.get((role, rank), ()))


#: The driver of a session the engine starts itself, on this machine only.
_LOOPBACK = {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}


def session(master: str, conf: dict[str, str]) -> SparkSession:
    """The active SparkSession, or a new one on `master` with `conf` (the YAML path).

    Executors must run this interpreter, so ``PYSPARK_PYTHON`` is set to it unless given.
    """
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName("corral")
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


class SparkEngine(Engine):
    """Runs plans as Spark barrier stages on the given (or the active) SparkSession.

    Args:
        spark: the session; by default the active one, or, if there is none when a job
            launches, a new one in local mode sized to the job (as TorchDistributor gets or
            creates one): ``local[N]``, N the CPUs its processes ask, at least one each.
        buffer_mb: the most memory a worker fed a DataFrame holds of its partition at
            once: the partition is spilled to the executor's disk in blocks this large,
            and read back one block at a time, however large the partition.

    Example:
        >>> spark = SparkSession.builder.master("local[2]").getOrCreate()
        >>> corral.run(train, workers=2, engine=corral.SparkEngine(spark))
    """

    def __init__(self, spark: SparkSession | None = None, *, buffer_mb: float = 64.0) -> None:
        if buffer_mb <= 0:
            raise SpecError(f"buffer_mb: must be more than 0, got {buffer_mb}")
        self.buffer_bytes = int(buffer_mb * 2**20)
        if spark is None and importlib.util.find_spec("pyspark") is None:
            raise LaunchError("the Spark engine needs pyspark: pip install 'corral[spark]'")
        self.spark = spark

    def _active(self) -> SparkSession | None:
        """The engine's session: the one given, else the active one, looked up when first
        needed (a session created after the engine, say by the user, counts)."""
        if self.spark is None:
            from pyspark.sql import SparkSession

            self.spark = SparkSession.getActiveSession()
        return self.spark

    @property
    def host(self) -> str:
        """The driver's address as the executors reach it (``spark.driver.host``); loopback
        for the local session `launch` would start."""
        spark = self._active()
        if spark is None:
            return _LOOPBACK["spark.driver.host"]
        return str(spark.sparkContext.getConf().get("spark.driver.host", "127.0.0.1"))

    def _session(self, plan: Plan) -> SparkSession:
        """The engine's session, or a new local one with a core for each CPU the plan's
        processes ask (and at least one per process: a barrier stage runs them all at once)."""
        spark = self._active()
        if spark is None:
            cores = sum(math.ceil(p.resources.cpus) for p in plan.processes)
            master = f"local[{max(cores, len(plan.processes))}]"
            log.info("no active SparkSession: starting one on %s", master)
            spark = self.spark = session(master, _LOOPBACK)
        return spark

    def launch(self, plan: Plan) -> SparkWorkerGroup:
        sc = self._session(plan).sparkContext
        if sc.getConf().get("spark.dynamicAllocation.enabled", "false").lower() == "true":
            raise LaunchError("Spark's barrier mode needs spark.dynamicAllocation.enabled=false")
        stages = _stages(sc, plan)
        _check_slots(sc, stages)
        return SparkWorkerGroup(sc, plan, stages, self.host, self.buffer_bytes)
