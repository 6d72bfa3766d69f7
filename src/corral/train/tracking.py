"""Every run in MLflow: `Tracker` logs a job from the driver, off the training path.

The workers already send the driver their reports (progress about twice a second from
the leading worker, a row per epoch, each restart the launcher spends), so tracking
costs the workers nothing: the `Tracker` takes those reports on the driver, queues them,
and a thread of its own sends them to MLflow in batches (``log_batch``: one request per
second at most, not one per metric, as MLflow's users ask). What a run holds:

* params: the job's settings flattened (``strategy.kind``, ``roles.worker.count``, …);
* tags: strategy, workers, engine and corral's version; restarts, lost workers;
* metrics: each epoch's history row at step = epoch; with ``step_metrics`` the progress
  reports' loss at step = the job's step count;
* artifacts: the settings as ``spec.json``, the last checkpoint, and the model
  (``mlflow.pytorch.log_model`` with an input example).

A run given by id (`MLflow.run_id`) is continued: its epochs already logged are not
logged again, so a restarted service job, or a resumed one, continues its history.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.comm.control import Message
from corral.errors import SpecError
from corral.spec import ClassicSpec, MLflow, TrainSettings

if TYPE_CHECKING:
    import torch
    from mlflow.tracking import MlflowClient

log = logging.getLogger("corral")

#: Most seconds between two batches sent to MLflow.
FLUSH_S = 1.0
#: MLflow's own limits on one ``log_batch`` request.
_MAX_METRICS, _MAX_PARAMS = 1000, 100


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), json.dumps(value) if not isinstance(value, str) else value


def params_of(settings: TrainSettings | ClassicSpec) -> dict[str, str]:
    """The settings as MLflow params: one per leaf, dotted (``checkpoint.every``,
    ``params.max_depth``)."""
    dumped = settings.model_dump(mode="json", exclude={"tracking"})
    return {key: text[:6000] for key, text in _flatten(dumped)}


def client_for(spec: MLflow) -> MlflowClient:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise SpecError(
            "tracking: MLflow is not installed here; pip install mlflow (or mlflow-skinny)"
        ) from None
    return MlflowClient(tracking_uri=spec.uri or os.environ.get("MLFLOW_TRACKING_URI"))


def open_run(spec: MLflow, *, tags: dict[str, str] | None = None) -> str:
    """The id of the run `spec` names, or of a new one in its experiment (created too)."""
    client = client_for(spec)
    if spec.run_id is not None:
        client.get_run(spec.run_id)  # an unknown id fails here, with MLflow's message
        return spec.run_id
    experiment = client.get_experiment_by_name(spec.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(spec.experiment)
    )
    tags = dict(tags or {})
    if spec.parent_run_id is not None:  # how MLflow's UI nests a child under its parent
        tags["mlflow.parentRunId"] = spec.parent_run_id
    run = client.create_run(experiment_id, tags=tags, run_name=spec.run_name)
    return str(run.info.run_id)


def run_url(uri: str | None, experiment_id: str, run_id: str) -> str | None:
    """The run's page on an MLflow server (None for a store with no web UI of its own)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class Tracker:
    """One job's MLflow run, fed with the driver's reports (see the module docstring)."""

    def __init__(self, spec: MLflow, *, params: dict[str, str], tags: dict[str, str]) -> None:
        self.spec = spec
        self.client = client_for(self.spec)
        tags = {**tags, "corral.version": importlib.metadata.version("corral")}
        self.run_id = open_run(self.spec, tags=tags)
        self.client.set_terminated(self.run_id, "RUNNING")
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self._logged = self._epochs_logged()
        if not self._logged:  # a continued run has them, and MLflow refuses a change
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), _MAX_PARAMS):
                self.client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS])
        self._queue: queue.Queue[Any] = queue.Queue()
        self._restarts = 0
        #: Reports of a `corral.run` function that name no step: the next step.
        self._reports = 0
        self._thread = threading.Thread(target=self._send, name="mlflow", daemon=True)
        self._thread.start()

    @classmethod
    def of_settings(cls, settings: TrainSettings, *, engine: str) -> Tracker:
        """A `Trainer` fit's run: its settings as params, its strategy and workers as tags."""
        assert settings.tracking is not None
        tags = {
            "corral.strategy": settings.strategy.kind,
            "corral.workers": str(settings.roles.worker.count),
            "corral.engine": engine,
        }
        return cls(settings.tracking, params=params_of(settings), tags=tags)

    @classmethod
    def of_job(cls, spec: ClassicSpec) -> Tracker:
        """A classic job's run (`corral.classic`): its spec as params, its kind, workers
        and engine as tags; its rounds are its epochs."""
        assert spec.tracking is not None
        tags = {
            "corral.kind": spec.kind,
            "corral.workers": str(spec.roles.worker.count),
            "corral.engine": spec.engine,
        }
        return cls(spec.tracking, params=params_of(spec), tags=tags)

    def _epochs_logged(self) -> set[int]:
        """The epochs this run holds already (it is continued)."""
        history = self.client.get_metric_history(self.run_id, "loss")
        return {int(m.step) for m in history}

    def report(self, msg: Message) -> None:
        """Queue what `msg` says (called on the driver's watching thread: never blocks)."""
        metrics = (msg.body or {}).get("metrics", {})
        kind = metrics.get("kind")
        now = int(1000 * (msg.body or {}).get("time", time.time()))
        if kind == "epoch":
            epoch = int(metrics["epoch"])
            if epoch in self._logged:
                return
            self._logged.add(epoch)
            skip = {"kind", "epoch", "epochs", "restored"}
            row = {k: v for k, v in metrics.items() if k not in skip}
            self._queue.put(("metrics", epoch, now, row))
        elif kind == "progress" and self.spec.step_metrics:
            step = (int(metrics["epoch"]) - 1) * int(metrics["steps"]) + int(metrics["step"])
            row = {"step_loss": metrics["loss"]}
            if "samples_per_s" in metrics:
                row["step_samples_per_s"] = metrics["samples_per_s"]
            self._queue.put(("metrics", step, now, row))
        elif kind == "restart":
            self._restarts = int(metrics["restarts"])
            tag = f"{self._restarts} of {metrics['max_restarts']}: {metrics['cause']}"
            self._queue.put(("tag", "corral.restarts", tag))
        elif kind is None and msg.rank == 0 and msg.role == "worker":
            # `corral.context().report(...)` from a `corral.run` function: rank 0's, at
            # the step it names (``step``, else ``epoch``), else at the next one
            named = metrics.get("step", metrics.get("epoch"))
            step = int(named) if isinstance(named, int | float) else self._reports
            self._reports = step + 1
            row = {k: v for k, v in metrics.items() if k not in ("step", "epoch")}
            self._queue.put(("metrics", step, now, row))

    def _send(self) -> None:
        """The sending thread: batches what is queued, at most one request a second."""
        from mlflow.entities import Metric, RunTag

        done = False
        while not done:
            metrics: list[Metric] = []
            tags: list[RunTag] = []
            deadline = time.monotonic() + FLUSH_S
            while time.monotonic() < deadline and len(metrics) < _MAX_METRICS:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                if item[0] == "metrics":
                    _, step, at, row = item
                    metrics += [
                        Metric(key, float(value), at, step)
                        for key, value in row.items()
                        if isinstance(value, int | float)
                    ]
                else:
                    tags.append(RunTag(item[1], item[2]))
            if metrics or tags:
                try:
                    self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
                except Exception as exc:  # tracking must never stop training
                    log.warning("MLflow: %d metrics not logged: %s", len(metrics), exc)

    def finish(
        self,
        *,
        ok: bool,
        model: torch.nn.Module | None = None,
        example: Any = None,
        checkpoint: Path | None = None,
        settings: TrainSettings | ClassicSpec | None = None,
        lost_workers: list[dict[str, Any]] | None = None,
        artifacts: Sequence[Path] = (),
    ) -> None:
        """Flush, log the artifacts, and end the run as FINISHED or FAILED."""
        self._queue.put(None)
        self._thread.join()
        try:
            if lost_workers:
                self.client.set_tag(self.run_id, "corral.lost_workers", json.dumps(lost_workers))
            if settings is not None:
                with tempfile.TemporaryDirectory() as folder:
                    path = Path(folder, "spec.json")
                    path.write_text(settings.model_dump_json(indent=2, exclude={"tracking"}))
                    self.client.log_artifact(self.run_id, str(path))
            if checkpoint is not None and checkpoint.exists():
                self.client.log_artifact(self.run_id, str(checkpoint), "checkpoints")
            for path in artifacts:  # a classic job's pickled model
                self.client.log_artifact(self.run_id, str(path))
            if model is not None and self.spec.log_model:
                self._log_model(model, example)
        finally:
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def _log_model(self, model: torch.nn.Module, example: Any) -> None:
        import mlflow
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.client.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(model, name="model", input_example=example)


def tracked(
    tracker: Tracker, on_report: Callable[[Message], None] | None
) -> Callable[[Message], None]:
    """`on_report`, with every report also given to `tracker`."""

    def report(msg: Message) -> None:
        tracker.report(msg)
        if on_report is not None:
            on_report(msg)

    return report
