"""From a validated `JobSpec` (YAML) to the objects `Trainer.fit` takes.

Paths in a job file (the entrypoint file, the data) are relative to the file's folder, so
a job directory can be moved or checked out anywhere and still run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corral.data import Source, as_source
from corral.entrypoints import load_callable
from corral.spec import LOSSES, DataSpec, JobSpec
from corral.train.trainer import Trainer


def _source(data: DataSpec, base: Path) -> Source:
    path = Path(data.path)
    return as_source(
        path if path.is_absolute() else base / path, features=data.features, label=data.label
    )


def _loss(name: str, base: Path) -> Any:
    if name in LOSSES:
        return LOSSES[name]()
    loss = load_callable(name, base=base, what="loss")
    return loss() if isinstance(loss, type) else loss


def trainer_for(spec: JobSpec, *, base: Path) -> tuple[Trainer, Source, Source | None]:
    """The trainer, training data and validation data a job spec describes."""
    model = load_callable(spec.entrypoint, base=base, what="entrypoint")
    trainer = Trainer.from_settings(
        spec, model=model, loss=_loss(spec.loss, base), optimizer=spec.optimizer
    )
    if spec.engine == "spark":
        from corral.engines.spark import SparkEngine, session

        trainer.engine = SparkEngine(
            session(spec.spark.master, spec.spark.conf), buffer_mb=spec.spark.buffer_mb
        )
    validation = _source(spec.validation, base) if spec.validation else None
    return trainer, _source(spec.data, base), validation
