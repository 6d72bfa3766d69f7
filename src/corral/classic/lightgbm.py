"""``kind: lightgbm``: gradient-boosted trees with LightGBM's own distributed training.

LightGBM trains data-parallel (``tree_learner: data``, or ``voting``) over a list of
machines that talk to each other through sockets: each machine holds a contiguous share of
the rows, the machines merge their histograms every round, and every one ends with the
same trees (Meng et al., "A Communication-Efficient Parallel Algorithm for Decision Tree",
NeurIPS 2016, for voting). corral runs those machines as it runs torch workers:

* ``engine: local``: ``roles.worker.count`` subprocesses on 127.0.0.1. The parent reads
  the Parquet data once with `read_arrays` (the torch trainer's checks, and the whole
  label column is needed anyway to count the classes every machine must agree on) and
  sends each worker its share, so a worker imports LightGBM and NumPy, not Arrow or torch.
  The parent holds the data once, as a one-worker fit would; data larger than one machine
  is what ``engine: spark`` is for. One worker trains in-process, without the network.
* ``engine: spark``: the workers are the tasks of one barrier stage over the DataFrame
  repartitioned to ``roles.worker.count``; each decodes its partition from Arrow, learns
  the others' ``host:port`` with one ``allGather``, and trains. The stage is refused at
  once when Spark cannot run all its tasks together, as a barrier stage would otherwise wait.

LightGBM needs the full machine list before any machine starts, so the ports are picked by
binding to port 0 and closing again just before the start; another process can take one in
between, so a fit whose start fails on a port or socket is retried whole, twice at most.

Every machine is given the *whole* validation set. LightGBM computes metrics on each
machine's own data without combining them, so with validation shares the machines could
stop early at different rounds, and the one still training would wait on the one gone
(LightGBM issues #6351 and #6956). The training metric (``loss``) is rank 0's share's.

Rank 0 reports each round as an epoch-shaped row: locally it sends the rows to the parent
as they come, and the parent calls `report` with each, so a search pruner
raising there stops the workers; on Spark the rows come back with the model and are
reported after the stage. A worker that dies ends the fit with a `WorkerError` naming it
(the parent watches every process; the others are stopped), not a hang.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from corral.classic.base import ClassicModel, Report, check_names, epoch_row, read_arrays
from corral.errors import CorralError, DataError, LaunchError, SpecError, WorkerError
from corral.spec import DataSpec, LightGBMSpec

if TYPE_CHECKING:
    import lightgbm

#: LightGBM parameters corral sets itself, by their main name, with where a spec sets them.
_OWNED = {
    "num_iterations": "rounds",
    "early_stopping_round": "early_stopping",
    "num_threads": "roles.worker.cpus",
    "seed": "seed",
    "num_class": "the labels (corral counts the classes)",
    "task": "task",
    "data": "data",
    "valid": "validation",
    "num_machines": "roles.worker.count",
    "machines": "roles.worker.count (corral lists the machines)",
    "machine_list_filename": "roles.worker.count (corral lists the machines)",
    "local_listen_port": "roles.worker.count (corral picks the ports)",
    "pre_partition": "roles.worker.count (each worker holds its own rows)",
}

#: The tree learners that train on rows split between the machines, as corral splits them.
_LEARNERS = ("data", "voting")

#: Objectives that predict one probability per class, and so need ``num_class``.
_MULTICLASS = ("multiclass", "softmax", "multiclassova", "multiclass_ova", "ova", "ovr")

#: Minutes LightGBM waits for the other machines to connect (its ``time_out``).
_TIME_OUT_MIN = 1

#: Whole starts of a distributed fit, when a start fails on a port taken meanwhile.
_ATTEMPTS = 3

#: Seconds the other workers get to end by themselves once one has failed.
_GRACE_S = 1.0

#: What LightGBM says when it cannot bind or reach a port.
_NETWORK = re.compile(r"binding port|socket|connect", re.IGNORECASE)


@functools.cache
def _aliases() -> dict[str, str]:
    """Every name LightGBM accepts for a parameter (aliases included), to its main name.

    From LightGBM's own table (``LGBM_DumpParamAliases``, read through the wrapper its
    Python package uses), so it follows the installed version.
    """
    from lightgbm.basic import _ConfigAliases

    table = _ConfigAliases._get_all_param_aliases()
    return {alias: main for main, names in table.items() for alias in names}


def check(spec: LightGBMSpec, *, base: Path) -> None:
    """Refuse `params` LightGBM does not know (naming the closest one), those corral sets
    itself (naming the spec field instead), and a tree learner that cannot split rows.

    `base` is unused: the data is checked as it is read.
    """
    aliases = _aliases()
    check_names(spec.params, aliases, where="params", library="LightGBM")
    for name, value in spec.params.items():
        main = aliases[name]
        if main in _OWNED:
            raise SpecError(f"params.{name}: corral sets it; use {_OWNED[main]}")
        if main == "tree_learner" and value not in _LEARNERS:
            raise SpecError(
                f"params.{name}: '{value}' does not train on rows split between workers; "
                f"use one of {', '.join(_LEARNERS)}"
            )


def fit(spec: LightGBMSpec, *, base: Path, report: Report) -> tuple[ClassicModel, dict[str, float]]:
    """Train `spec` on its engine; returns the model and its final metrics."""
    fitter = _fit_spark if spec.engine == "spark" else _fit_local
    return fitter(spec, base, report)


class BoostedTrees:
    """A LightGBM Booster with scikit-learn's ``predict``: classes or values per row.

    Attributes:
        booster: The trained ``lightgbm.Booster`` (pickled as its model text).
        classifier: Whether it predicts classes (from probabilities) rather than values.
    """

    def __init__(self, booster: lightgbm.Booster, classifier: bool) -> None:
        self.booster, self.classifier = booster, classifier

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Each row's most probable class (one probability per class, or that of class 1
        for a binary objective), or its value."""
        out = np.asarray(self.booster.predict(x))
        if not self.classifier:
            return out
        return out.argmax(axis=1) if out.ndim == 2 else (out > 0.5).astype(np.int64)


@dataclass(frozen=True)
class _Fit:
    """What every machine trains with: all but its share of the rows and its port."""

    valid: tuple[np.ndarray, np.ndarray] | None
    params: dict[str, Any]
    rounds: int
    early_stopping: int | None


def _train(
    x: np.ndarray,
    y: np.ndarray,
    job: _Fit,
    network: dict[str, Any],
    on_round: Report | None,
) -> lightgbm.Booster:
    """Train on `x`, `y` (this machine's rows) with `network`'s machine parameters;
    `on_round` gets each round's row (rank 0's only, which also evaluates its rows)."""
    import lightgbm

    train = lightgbm.Dataset(x, y)
    sets, names = [], []
    if on_round is not None:
        sets, names = [train], ["training"]
    if job.valid is not None:
        sets.append(lightgbm.Dataset(*job.valid, reference=train))
        names.append("val")
    callbacks: list[Callable[..., None]] = []
    if on_round is not None:
        callbacks.append(_Rounds(on_round, job.rounds))
    if job.early_stopping is not None:
        callbacks.append(lightgbm.early_stopping(job.early_stopping, verbose=False))
    booster = lightgbm.train(
        {**job.params, **network},
        train,
        num_boost_round=job.rounds,
        valid_sets=sets,
        valid_names=names,
        callbacks=callbacks,
    )
    if network:
        booster.free_network()  # the network is the process's: a Spark worker is reused
    return booster


class _Rounds:
    """A LightGBM callback making each round's evaluation an epoch row: ``loss`` is the
    first training metric, ``val_<metric>`` the validation set's."""

    order = 20  # before early stopping (30), so the round it stops at is reported too

    def __init__(self, report: Report, rounds: int) -> None:
        self.report, self.rounds = report, rounds

    def __call__(self, env: Any) -> None:
        metrics: dict[str, float] = {}
        for data, metric, value, *_ in env.evaluation_result_list:
            key = f"val_{metric}" if data == "val" else "loss"
            metrics.setdefault(key, float(value))
        self.report(epoch_row(env.iteration + 1, self.rounds, metrics))


# -- what both engines share: the labels, the parameters, the final metrics


def _check_labels(low: float, high: float, integral: bool, where: str) -> None:
    """Refuse class labels that are not integers from 0 (LightGBM's class numbers)."""
    if not integral or low < 0:
        raise DataError(
            f"{where}: classification needs the classes as integers 0..k-1; "
            f"the labels run from {low:g} to {high:g}" + ("" if integral else ", not all integers")
        )


def _class_count(low: float, high: float, integral: bool) -> int:
    """How many classes the training labels, from `low` to `high`, number (0..k-1)."""
    _check_labels(low, high, integral, "data")
    if high < 1:
        raise DataError("data: every label is 0; classification needs two classes or more")
    return int(high) + 1


def _check_validation_labels(y: np.ndarray, classes: int) -> None:
    """Refuse validation labels that are not among the training data's classes."""
    _check_labels(y.min(), y.max(), _integral(y), "validation")
    if y.max() >= classes:
        raise DataError(
            f"validation: label {y.max():g} is a class the training data lacks "
            f"(it has 0..{classes - 1})"
        )


def _integral(y: np.ndarray) -> bool:
    return bool(np.all(y == np.round(y)))


def _params(spec: LightGBMSpec, classes: int) -> dict[str, Any]:
    """LightGBM's parameters: corral's defaults, the spec's `params` by their main names,
    and what corral sets itself."""
    aliases = _aliases()
    given = {aliases[name]: value for name, value in spec.params.items()}
    params: dict[str, Any] = {"verbosity": -1}
    if spec.task == "classification":
        params["objective"] = "binary" if classes == 2 else "multiclass"
    else:
        params["objective"] = "regression"
    params.update(given)
    if spec.task == "classification" and params["objective"] in _MULTICLASS:
        params["num_class"] = classes
    params.update(seed=spec.seed, num_threads=spec.roles.worker.cpus)
    if spec.roles.worker.count > 1:
        params.setdefault("tree_learner", "data")
        params.setdefault("time_out", _TIME_OUT_MIN)
    return params


def _score(predicted: np.ndarray, y: np.ndarray, classifier: bool) -> float:
    """Rows right (a classifier) or the squared error (a regressor), summed."""
    if classifier:
        return float(np.sum(predicted == y))
    return float(np.sum((predicted - y) ** 2))


def _metric(total: float, rows: int, classifier: bool, prefix: str) -> dict[str, float]:
    """``<prefix>_accuracy`` or ``<prefix>_rmse`` from `_score`'s sum over `rows`."""
    if classifier:
        return {f"{prefix}_accuracy": total / rows}
    return {f"{prefix}_rmse": math.sqrt(total / rows)}


def _validation_spec(spec: LightGBMSpec, features: list[str]) -> DataSpec | None:
    """The validation data, read with the training data's features."""
    val = spec.validation
    if val is None:
        return None
    if val.features is not None and list(val.features) != features:
        raise DataError(
            f"validation.features: {val.features} differ from the training features {features}"
        )
    return val.model_copy(update={"features": features})


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free now on every interface (LightGBM listens on all); they are
    released at once, for LightGBM to bind, so one may be taken meanwhile."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# -- engine: local


def _fit_local(
    spec: LightGBMSpec, base: Path, report: Report
) -> tuple[ClassicModel, dict[str, float]]:
    x, y, features = read_arrays(spec.data, base)
    val_spec = _validation_spec(spec, features)
    valid = read_arrays(val_spec, base)[:2] if val_spec is not None else None
    classifier = spec.task == "classification"
    classes = 0
    if classifier:
        classes = _class_count(y.min(), y.max(), _integral(y))
        y = y.astype(np.int64)
        if valid is not None:
            _check_validation_labels(valid[1], classes)
    job = _Fit(valid, _params(spec, classes), spec.rounds, spec.early_stopping)
    workers = spec.roles.worker.count
    if workers == 1:
        booster = _train(x, y, job, {}, report)
    else:
        booster = _distributed(x, y, job, workers, report)
    model = ClassicModel(BoostedTrees(booster, classifier), features, classifier, "lightgbm")
    vx, vy = valid if valid is not None else (x, y)
    prefix = "val" if valid is not None else "train"
    metrics = _metric(_score(model.predict(vx), vy, classifier), len(vy), classifier, prefix)
    return model, {**metrics, "rounds": float(booster.current_iteration())}


def _distributed(
    x: np.ndarray, y: np.ndarray, job: _Fit, workers: int, report: Report
) -> lightgbm.Booster:
    """Train on `workers` processes, starting over when a start fails on a port."""
    import lightgbm

    for attempt in range(_ATTEMPTS):
        gang = _Gang(x, y, job, workers)
        try:
            return lightgbm.Booster(model_str=gang.run(report))
        except WorkerError as exc:
            if gang.reported or not _NETWORK.search(exc.detail) or attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # the last attempt returns or raises


class _Gang:
    """One start of the local worker processes, watched until they end.

    The workers are subprocesses (``python -c``), not `multiprocessing` ones: spawn and
    forkserver re-import the caller's ``__main__``, which re-runs a script without a
    ``__main__`` guard, or ``python -m corral`` itself. Each gets one end of a socket pair,
    its job pickled through it, and sends its messages back on it; when the caller dies
    (SIGKILL included) the socket closes and the worker exits (`_serve`). Its command line
    ends in ``corral-lightgbm-worker-<rank>``, for ``ps``.

    When one worker fails, the others lose a peer and fail too, within `_GRACE_S`; the
    error raised is the most telling: a worker that died without a word (a signal), then
    one that raised, then one that only lost its connection.

    Attributes:
        reported: Whether a round was reported (a failure after that is not retried).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, job: _Fit, workers: int) -> None:
        self.reported = False
        self._x, self._y, self._job, self._workers = x, y, job, workers
        self._conns: dict[int, Connection] = {}
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._failures: list[tuple[int, WorkerError]] = []  # (how telling: lowest first, error)
        self._model: str | None = None

    def run(self, report: Report) -> str:
        """Start the workers, pass rank 0's rows to `report` as they come, and return the
        model text; stops every worker however it ends (`report` raising included)."""
        try:
            self._start()
            self._watch(report)
        finally:
            self._stop()
        if self._failures:
            raise min(self._failures, key=lambda f: f[0])[1]
        if self._model is None:
            raise CorralError("lightgbm: worker 0 ended without sending its model")
        return self._model

    def _start(self) -> None:
        """Start every worker, then send each its job (they import while others start)."""
        from corral.data.sharding import rank_range  # here: corral.data imports torch

        ports = _free_ports(self._workers)
        machines = ",".join(f"127.0.0.1:{port}" for port in ports)
        for rank in range(self._workers):
            ours, theirs = socket.socketpair()
            with theirs:
                code = f"from corral.classic.lightgbm import _serve; _serve({theirs.fileno()})"
                self._procs[rank] = subprocess.Popen(
                    [sys.executable, "-c", code, f"corral-lightgbm-worker-{rank}"],
                    stdin=subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,  # a Ctrl-C reaches the caller, which stops them
                )
            self._conns[rank] = Connection(ours.detach())
        for rank, port in enumerate(ports):
            lo, hi = rank_range(len(self._x), rank, self._workers)
            network = {
                "machines": machines,
                "num_machines": self._workers,
                "local_listen_port": port,
            }
            with contextlib.suppress(OSError):  # it died starting: `_watch` says how
                self._conns[rank].send((rank, self._x[lo:hi], self._y[lo:hi], self._job, network))

    def _watch(self, report: Report) -> None:
        """Handle messages until every worker has ended, or `_GRACE_S` after a failure."""
        deadline = math.inf
        while self._conns and time.monotonic() < deadline:
            ranks = {id(conn): rank for rank, conn in self._conns.items()}
            timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
            for ready in wait(list(self._conns.values()), timeout):
                self._receive(ranks[id(ready)], report)
            if self._failures and deadline == math.inf:
                deadline = time.monotonic() + _GRACE_S

    def _receive(self, rank: int, report: Report) -> None:
        conn = self._conns[rank]
        try:
            kind, *body = conn.recv()
        except EOFError:  # the worker ended
            conn.close()
            del self._conns[rank]
            self._ended(rank, self._procs[rank].wait())
            return
        if kind == "row":
            self.reported = True
            report(body[0])
        elif kind == "done":
            self._model = body[0] if rank == 0 else self._model
        else:
            exc_type, detail, remote = body
            error = WorkerError(
                role="worker", rank=rank, exc_type=exc_type, detail=detail, remote_traceback=remote
            )
            telling = 2 if _NETWORK.search(detail) else 1  # a lost peer is a consequence
            self._failures.append((telling, error))

    def _ended(self, rank: int, code: int) -> None:
        """Count a worker that ended without saying why (a signal, an exit code)."""
        if code == 0 or any(e.rank == rank for _, e in self._failures):
            return
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0
            else f"exited with code {code}"
        )
        self._failures.append((0, WorkerError(role="worker", rank=rank, exc_type=None, detail=how)))

    def _stop(self) -> None:
        """SIGTERM the workers still running, then SIGKILL those left after 5 s."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns.values():
            conn.close()


def _serve(fd: int) -> None:
    """A local worker process: receive its job on socket `fd`, train its rows, and send
    back (rank 0) each round's row and the model, or (any rank) the error that ended it."""
    conn = Connection(fd)
    rank, x, y, job, network = conn.recv()
    threading.Thread(target=_exit_with_caller, args=(conn,), daemon=True).start()
    try:
        on_round = (lambda row: conn.send(("row", row))) if rank == 0 else None
        booster = _train(x, y, job, network, on_round)
        conn.send(("done", booster.model_to_string() if rank == 0 else None))
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, str(exc), traceback.format_exc()))
        raise SystemExit(1) from None


def _exit_with_caller(conn: Connection) -> None:
    """Wait for the caller's end of `conn` to close (the caller sends nothing after the
    job), and end this process then: the caller died, or gave up on it."""
    with contextlib.suppress(EOFError, OSError):
        conn.recv_bytes()
    os._exit(1)


# -- engine: spark


def _fit_spark(
    spec: LightGBMSpec, base: Path, report: Report
) -> tuple[ClassicModel, dict[str, float]]:
    from pyspark.sql.pandas.types import to_arrow_schema

    from corral.engines.spark import session, task_slots
    from corral.spark import held_out, training_input

    spark = session(spec.spark.master, spec.spark.conf)
    workers = spec.roles.worker.count
    slots = task_slots(spark.sparkContext)
    if slots < workers:
        raise LaunchError(
            f"the job needs {workers} task slots at once; Spark has {slots}: "
            "add cores or lower roles.worker.count"
        )
    raw = spark.read.parquet(str(base / spec.data.path))  # base / an absolute path is it
    df, features, _ = training_input(raw, spec.data.features, spec.data.label, workers)
    val_spec = _validation_spec(spec, features)
    valid = None
    if val_spec is not None:
        valid = held_out(spark.read.parquet(str(base / val_spec.path)), features, val_spec.label)
    classifier = spec.task == "classification"
    classes = 0
    if classifier:
        classes = _spark_classes(df, spec.data.label)
        if valid is not None:
            _check_validation_labels(valid[1], classes)
    job = _Fit(valid, _params(spec, classes), spec.rounds, spec.early_stopping)
    parts = df if df.rdd.getNumPartitions() == workers else df.repartition(workers)
    task = _task(job, features, spec.data.label, classifier, to_arrow_schema(df.schema))
    schema = "rank long, model string, history string, score double, rows long"
    for attempt in range(_ATTEMPTS):
        try:
            results = parts.mapInArrow(task, schema, barrier=True).collect()
            break
        except Exception as exc:  # the stage failed; Spark's error holds the task's
            reason = _spark_reason(exc)
            if not re.search("binding port", reason, re.IGNORECASE) or attempt == _ATTEMPTS - 1:
                raise CorralError(f"lightgbm: the Spark stage failed: {reason}") from exc
    return _spark_result(results, features, classifier, valid, report)


def _spark_reason(exc: Exception) -> str:
    """The task's own error in a failed stage's (the last ``SomeError: why`` line of the
    Python traceback Spark wraps), or the error's first line."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    python = [
        line.strip()
        for line in lines
        if re.match(r"\s*[\w.]*(Error|Exception): ", line)
        and not line.strip().startswith(("org.", "py4j.", "java."))
    ]
    return python[-1] if python else lines[0]


def _spark_classes(df: Any, label: str) -> int:
    """`_class_count` of a DataFrame's label column, in one Spark job."""
    from pyspark.sql import functions as F

    col = F.col(label)
    low, high, odd = df.agg(
        F.min(col), F.max(col), F.sum((col != F.floor(col)).cast("int"))
    ).collect()[0]
    return _class_count(low, high, not odd)


def _spark_result(
    results: list[Any],
    features: list[str],
    classifier: bool,
    valid: tuple[np.ndarray, np.ndarray] | None,
    report: Report,
) -> tuple[ClassicModel, dict[str, float]]:
    """The model rank 0 sent, its rows reported, and the final metrics: on the validation
    set (on the driver), or summed over every task's rows."""
    import json

    import lightgbm

    first = next(r for r in results if r["rank"] == 0)
    for row in json.loads(first["history"]):
        report(row)
    booster = lightgbm.Booster(model_str=first["model"])
    model = ClassicModel(BoostedTrees(booster, classifier), features, classifier, "lightgbm")
    if valid is not None:
        vx, vy = valid
        metrics = _metric(_score(model.predict(vx), vy, classifier), len(vy), classifier, "val")
    else:
        total, rows = sum(r["score"] for r in results), sum(r["rows"] for r in results)
        metrics = _metric(total, rows, classifier, "train")
    return model, {**metrics, "rounds": float(booster.current_iteration())}


def _task(
    job: _Fit, features: list[str], label: str, classifier: bool, schema: Any
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """What each task of the barrier stage runs: decode its partition, learn every task's
    ``host:port``, train, and return its score (and, rank 0, the model and its rows)."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import json

        import pyarrow as pa
        from pyspark import BarrierTaskContext

        from corral.data.arrow import feature_matrix, label_vector

        ctx = BarrierTaskContext.get()
        rank = ctx.partitionId()
        table = pa.Table.from_batches(list(batches), schema=schema)
        x, y = feature_matrix(table, features), label_vector(table, label)
        if classifier:
            y = y.astype(np.int64)
        host = socket.gethostbyname(ctx.getTaskInfos()[rank].address.rsplit(":", 1)[0])
        port = _free_ports(1)[0]
        machines = ctx.allGather(f"{host}:{port}")
        network = {
            "machines": ",".join(machines),
            "num_machines": len(machines),
            "local_listen_port": port,
        }
        history: list[dict[str, Any]] = []
        booster = _train(x, y, job, network, history.append if rank == 0 else None)
        yield pa.RecordBatch.from_pydict(
            {
                "rank": [rank],
                "model": [booster.model_to_string() if rank == 0 else ""],
                "history": [json.dumps(history)],
                "score": [_score(BoostedTrees(booster, classifier).predict(x), y, classifier)],
                "rows": [len(y)],
            }
        )

    return run
