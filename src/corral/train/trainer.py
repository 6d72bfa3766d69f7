"""`Trainer`: train a single-device model on many workers without writing distributed code.

Everything that can be checked on the caller's side is checked before a worker starts:
settings (through `TrainSettings`), the model factory (called once here; its model also
receives the trained weights), the data (columns, lengths, NaN), and ``resume_from``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from corral.comm.control import Message
from corral.data import Source, as_source
from corral.data.spill import SpillSource
from corral.engines import resolve
from corral.engines.base import Engine
from corral.errors import SpecError
from corral.runtime import checkpoint as ckpt
from corral.spec import MLflow, TrainSettings, parse
from corral.strategies import Strategy, Supervisor
from corral.strategies.base import LossFn
from corral.train.launcher import LaunchOptions, ProcessLoss, launch
from corral.train.loop import ModelArg, OptimizerFn, TrainTask, build_model, train_worker
from corral.train.progress import log_report
from corral.train.tracking import Tracker, tracked

log = logging.getLogger("corral")


@dataclass
class Result:
    """What `Trainer.fit` returns.

    Attributes:
        model: The trained model on the caller's side, in eval mode.
        history: One dict per epoch: ``loss``, ``accuracy`` (classification),
            ``val_loss``/``val_accuracy`` (with validation data), ``samples_per_s``,
            ``syncs`` (communication rounds) and ``time_s``.
        checkpoint: Path of the last checkpoint written.
        lost_workers: One dict per worker the job lost and trained on without (strategies
            that tolerate it): ``rank``, ``attempt``, ``cause``, ``epoch``,
            ``steps_done``/``steps`` of its share of that epoch, ``samples_not_trained``
            and ``replaced_by``.
        features: The feature columns trained on (named-column data only).
        width: The model's number of inputs, when the features were Spark columns.
    """

    model: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    lost_workers: list[dict[str, Any]] = field(default_factory=list)
    #: The feature columns trained on, when the data had named columns.
    features: list[str] | None = None
    #: How many inputs those columns gave (array and vector columns give several).
    width: int | None = None

    def model_udf(
        self, df: Any, features: str | list[str] | None = None, output: str = "prediction"
    ) -> Any:
        """A Spark DataFrame `df` with a column `output` of this model's predictions.

        Scores whole Arrow batches on the executors; see `corral.spark`. `features`
        defaults to the columns trained on.
        """
        from corral import spark

        return spark.model_udf(df, self, features, output)

    @property
    def metrics(self) -> dict[str, float]:
        """The last epoch's metrics."""
        return self.history[-1] if self.history else {}


class Trainer:
    """Data-parallel training of a single-device PyTorch model.

    Example:
        >>> trainer = corral.Trainer(
        ...     model=make_model, loss=torch.nn.CrossEntropyLoss(),
        ...     optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
        ...     strategy=corral.Averaging(every=16), workers=4, epochs=10, batch_size=32)
        >>> result = trainer.fit((X, y), validation=(X_test, y_test))
        >>> result.history[-1]["val_accuracy"]
        0.97

    Args:
        model: An ``nn.Module`` or a zero-argument factory returning one.
        loss: Any callable ``(output, target) -> scalar tensor``.
        optimizer: A callable taking parameters and returning an optimizer, or an
            `OptimizerSpec`.
        strategy: A `Strategy` object or its name (``"allreduce"``, ``"averaging"``).
        workers: Number of worker processes.
        epochs: Total epochs; a resumed run trains only those not done yet.
        batch_size: Samples per worker per step, at most (see README: sharding).
        cpus_per_worker, gpus_per_worker, memory_per_worker: Resources of each worker.
        checkpoint_every: Write a checkpoint every this many epochs (and after the last).
        checkpoint_dir: Where to write them; default ``./corral-runs/job-<time>``.
        max_restarts: Relaunch all workers from the newest checkpoint this many times
            when one dies.
        resume_from: A checkpoint file, or a folder of them, to continue from.
        engine: Where the processes run: ``"local"`` (default), ``"spark"`` (the active
            SparkSession; see `corral.SparkEngine`) or an `Engine`.
        tracking: ``"mlflow"`` or `corral.MLflow` (uri, experiment, …): log the job to
            MLflow (`corral.train.tracking`).
    """

    def __init__(
        self,
        *,
        model: ModelArg,
        loss: LossFn,
        optimizer: OptimizerFn | None = None,
        strategy: Strategy | str | dict[str, Any] | None = None,
        workers: int = 1,
        epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
        cpus_per_worker: int = 1,
        gpus_per_worker: int = 0,
        memory_per_worker: int | str | None = None,
        checkpoint_every: int = 1,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        keep_checkpoints: int = 3,
        max_restarts: int = 0,
        resume_from: str | os.PathLike[str] | None = None,
        master_port: int | None = None,
        engine: Engine | str | None = None,
        tracking: MLflow | str | dict[str, Any] | None = None,
    ) -> None:
        for name, value in (("loss", loss), ("optimizer", optimizer or callable)):
            if not callable(value):
                raise SpecError(f"{name}: expected a callable, got {type(value).__name__}")
        if not (isinstance(model, torch.nn.Module) or callable(model)):
            raise SpecError(
                f"model: expected an nn.Module or a factory, got {type(model).__name__}"
            )
        raw: dict[str, Any] = {
            "roles": {
                "worker": {
                    "count": workers,
                    "cpus": cpus_per_worker,
                    "gpus": gpus_per_worker,
                    "memory": memory_per_worker,
                }
            },
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
            "shuffle": shuffle,
            "max_restarts": max_restarts,
            "resume_from": resume_from,
            "master_port": master_port,
            "checkpoint": {
                "every": checkpoint_every,
                "dir": checkpoint_dir,
                "keep": keep_checkpoints,
            },
        }
        if strategy is not None:
            raw["strategy"] = strategy
        if tracking is not None:
            raw["tracking"] = tracking
        self.settings = parse(TrainSettings, raw, source="Trainer arguments")
        if optimizer is None and self.settings.strategy.needs_optimizer:
            raise SpecError(f"optimizer: required by the {self.settings.strategy.kind} strategy")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.engine = resolve(engine)

    @classmethod
    def from_settings(
        cls,
        settings: TrainSettings,
        *,
        model: ModelArg,
        loss: LossFn,
        optimizer: OptimizerFn | None,
    ) -> Trainer:
        """Build a trainer from already-validated settings (the YAML path)."""
        trainer = cls(model=model, loss=loss, optimizer=optimizer, strategy=settings.strategy)
        trainer.settings = settings
        return trainer

    def fit(
        self,
        data: Any,
        *,
        features: str | list[str] | None = None,
        label: str | None = None,
        validation: Any = None,
        on_report: Callable[[Message], None] | None = log_report,
    ) -> Result:
        """Train on `data` and return the trained model, its history and last checkpoint.

        Args:
            data: ``(X, y)`` numpy arrays, a pandas DataFrame (with `features` and `label`),
                a Parquet file or folder path (with `features` and `label`), a map-style
                torch ``Dataset`` of ``(x, y)`` pairs, or a `corral.data.Source`.
            features, label: Column names, for DataFrames and Parquet.
            validation: Held-out data of the same kind, evaluated after every epoch.
            on_report: Called with every progress and epoch report; by default they are
                logged at INFO on the ``corral`` logger. Each epoch of the job's history
                is reported once per fit: the epochs a checkpoint restored (after a
                restart, or with ``resume_from``) come first, with ``restored=True``.
                Each restart the launcher spends is a report of ``kind="restart"``.
        """
        s = self.settings
        workers = s.roles.worker.count
        feed, width = None, None
        group = s.strategy.group_column()  # read beside the features, never one of them
        if _is_spark_dataframe(data):
            if group is not None:
                raise SpecError(
                    f"strategy {s.strategy.kind}: the client id column {group!r} is read "
                    "from a pandas DataFrame or Parquet data, not a Spark DataFrame"
                )
            train, feed, features, width = self._spark_input(data, features, label, workers)
        else:
            if isinstance(features, str):
                raise SpecError(
                    "features: a single column name (an array or vector column) is for "
                    "Spark DataFrames; here, pass a list of numeric columns"
                )
            train = as_source(data, features=features, label=label, groups=group)
            train.steps_per_epoch(workers, s.batch_size)  # fails now if it cannot be split
            if group is not None and features is None and not isinstance(validation, Source):
                # the validation data's features are these, its id column (if any) left out
                features = getattr(train, "features", None)
        valid: Source | None = None
        if validation is not None:
            if _is_spark_dataframe(validation):  # held-out data is small: score it here
                from corral.spark import held_out

                assert features is not None and label is not None  # set by _spark_input
                valid = as_source(held_out(validation, list(features), label))
            else:
                valid = as_source(validation, features=features, label=label)
            valid.steps_per_epoch(workers, s.batch_size)
        s.strategy.check_data(train, seed=s.seed)
        resume = ckpt.resolve(s.resume_from) if s.resume_from is not None else None
        if resume is not None:
            ckpt.load(resume)  # a bad file fails here, before any worker starts
        local_model = self._model_on_caller()
        checkpoint_dir = s.checkpoint.dir or Path.cwd() / "corral-runs" / time.strftime(
            "job-%Y%m%d-%H%M%S"
        )
        plan = s.plan()
        task = TrainTask(
            model=self.model,
            loss=self.loss,
            optimizer=self.optimizer,
            settings=s,
            plan=plan.strategy,
            train=train,
            validation=valid,
            resume_from=resume,
        )
        tracker = None
        if s.tracking is not None:
            engine = type(self.engine).__name__.removesuffix("Engine").lower()
            tracker = Tracker.of_settings(s, engine=engine)
            on_report = tracked(tracker, on_report)
        losses = _Losses(plan.strategy.supervisor, on_report)
        opts = LaunchOptions(
            workers=plan.workers.count,
            resources=plan.workers.resources,
            max_restarts=s.max_restarts,
            master_port=s.master_port,
            checkpoint_dir=checkpoint_dir,
            keep_checkpoints=s.checkpoint.keep,
            engine=self.engine,
            on_report=losses.report,
            helpers=plan.strategy.helpers,
            tolerate_worker_loss=plan.strategy.tolerates_worker_loss,
            on_lost=losses.lost,
            feed=feed,
            membership=plan.strategy.keys if plan.strategy.membership else None,
        )
        try:
            out = launch(train_worker, (task,), opts)
        except BaseException:
            if tracker is not None:
                tracker.finish(ok=False, settings=s, lost_workers=losses.workers)
            raise
        local_model.load_state_dict(out["state_dict"])
        checkpoint = Path(out["checkpoint"]) if out["checkpoint"] else None
        if tracker is not None:
            tracker.finish(
                ok=True,
                model=local_model.eval(),
                example=_example(train),
                checkpoint=checkpoint,
                settings=s,
                lost_workers=losses.workers,
            )
        return Result(
            model=local_model.eval(),
            history=losses.complete(out["history"]),
            checkpoint=checkpoint,
            lost_workers=losses.workers,
            features=list(features) if features else None,
            width=width,
        )

    def _spark_input(
        self, df: Any, features: str | list[str] | None, label: str | None, workers: int
    ) -> tuple[Source, Any, list[str], int]:
        """A Spark DataFrame stays where it is: each worker's task reads one partition."""
        from corral.engines.spark import SparkEngine
        from corral.spark import training_input

        if not isinstance(self.engine, SparkEngine):
            raise SpecError(
                "a Spark DataFrame trains on engine='spark' (or corral.SparkEngine(spark)), "
                "where each worker reads its own partition"
            )
        feed, names, width = training_input(df, features, label, workers)
        assert label is not None
        return SpillSource(names, label), feed, names, width

    def _model_on_caller(self) -> torch.nn.Module:
        """Build the model here once: a broken factory fails now, with its own message."""
        if isinstance(self.model, torch.nn.Module):
            return copy.deepcopy(self.model)
        name = getattr(self.model, "__qualname__", repr(self.model))
        try:
            return build_model(self.model)
        except Exception as exc:
            raise SpecError(
                f"model: the factory {name} raised {type(exc).__name__}: {exc}"
            ) from exc


class _Losses:
    """The caller's record of workers lost mid-job, and of the epochs reported meanwhile.

    A worker that joined late and ends up leading (every original worker died) returns a
    history without the epochs before it joined; the rows reported to the caller fill it.
    """

    def __init__(
        self, supervisor: Supervisor | None, on_report: Callable[[Message], None] | None
    ) -> None:
        self.supervisor, self.on_report = supervisor, on_report
        self.workers: list[dict[str, Any]] = []
        self.rows: dict[int, dict[str, Any]] = {}

    def report(self, msg: Message) -> None:
        """Forward `msg`, each epoch once: a restarted attempt reports again the epochs
        its checkpoint holds, and only those this caller has not seen pass."""
        metrics = (msg.body or {}).get("metrics", {})
        if metrics.get("kind") == "epoch":
            row = {k: v for k, v in metrics.items() if k not in ("kind", "epochs", "restored")}
            if int(row["epoch"]) in self.rows:
                return
            self.rows[int(row["epoch"])] = row
        if self.on_report is not None:
            self.on_report(msg)

    def lost(self, loss: ProcessLoss, store: dist.Store) -> None:
        assert self.supervisor is not None  # the launcher absorbs losses only then
        cause = loss.failure.detail
        if loss.failure.exc_type:
            cause = f"raised {loss.failure.exc_type}: {cause}"
        if loss.role != "worker":
            lost = [w["rank"] for w in self.workers if w["attempt"] == loss.attempt]
            self.supervisor.helper_restarted(loss.role, loss.rank, lost, store)
            log.warning("%s %d %s; %s", loss.role, loss.rank, cause, loss.reason)
            return
        left = self.supervisor.worker_lost(loss.rank, loss.replaced_by, store)
        self.workers.append(
            {
                "rank": loss.rank,
                "attempt": loss.attempt,
                "cause": cause,
                **left,
                "replaced_by": loss.replaced_by,
            }
        )
        undone = (
            f" in epoch {left['epoch']} after {left['steps_done']} of its {left['steps']} "
            f"steps; {left['samples_not_trained']} samples of its share of that epoch were "
            "not trained, and from the next epoch the others take its share"
            if left
            else " before it started training"
        )
        log.warning("worker %d %s%s; %s", loss.rank, cause, undone, loss.reason)

    def complete(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        done = {int(row["epoch"]) for row in history}
        missing = [row for epoch, row in self.rows.items() if epoch not in done]
        return sorted([*missing, *history], key=lambda row: row["epoch"])


def _example(source: Source) -> Any:
    """Two rows of the training inputs, as the model takes them (for MLflow's signature);
    None where the caller cannot read them (a Spark DataFrame stays on the executors)."""
    if isinstance(source, SpillSource):
        return None
    x, _ = next(iter(source.batches(rank=0, world_size=1, epoch=0, seed=0, batch_size=2)))
    return x.numpy()


def _is_spark_dataframe(obj: Any) -> bool:
    """True for a pyspark DataFrame, without importing pyspark."""
    return type(obj).__name__ == "DataFrame" and type(obj).__module__.startswith("pyspark.sql")
