"""From a validated `JobSpec` (YAML) to the objects `Trainer.fit` takes, and back.

Paths in a job file (the entrypoint file, the data) are relative to the file's folder, so
a job directory can be moved or checked out anywhere and still run.

`job_of_trainer` goes the other way, for `corral.tune` given a `Trainer`: a trial is a
job process that rebuilds its trainer from a spec, so the trainer's Python objects (its
model factory, loss and optimizer) are cloudpickled into a file the spec refers to, and
in-memory data is written as Parquet beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pandas as pd

from corral.data import Source, as_source
from corral.engines.local import LocalEngine
from corral.entrypoints import load_callable
from corral.errors import SpecError
from corral.spec import LOSSES, DataSpec, JobSpec, OptimizerSpec
from corral.train.trainer import Trainer


def source_for(data: DataSpec, base: Path, *, groups: str | None = None) -> Source:
    """The source a job's `data` (or `validation`) section names, paths from `base`;
    `groups` is the column the strategy reads beside the features (`Strategy.group_column`)."""
    path = Path(data.path)
    return as_source(
        path if path.is_absolute() else base / path,
        features=data.features,
        label=data.label,
        groups=groups,
    )


def _loss(name: str, base: Path) -> Any:
    if name in LOSSES:
        return LOSSES[name]()
    loss = load_callable(name, base=base, what="loss")
    return loss() if isinstance(loss, type) else loss


def parts_for(spec: JobSpec, *, base: Path) -> tuple[Any, Any, Any]:
    """The model factory, loss and optimizer (factory or spec) a job spec names."""
    model = load_callable(spec.entrypoint, base=base, what="entrypoint")
    optimizer = spec.optimizer
    if isinstance(optimizer, str):
        optimizer = load_callable(optimizer, base=base, what="optimizer")
    return model, _loss(spec.loss, base), optimizer


def trainer_for(spec: JobSpec, *, base: Path) -> tuple[Trainer, Source, Source | None]:
    """The trainer, training data and validation data a job spec describes."""
    if spec.federation is not None:
        raise SpecError(
            "federation: real clients train this job; serve it with corral fl serve "
            "(or submit it to the service), or remove federation to simulate them"
        )
    model, loss, optimizer = parts_for(spec, base=base)
    trainer = Trainer.from_settings(spec, model=model, loss=loss, optimizer=optimizer)
    if spec.engine == "spark":
        from corral.engines.spark import SparkEngine, session

        trainer.engine = SparkEngine(
            session(spec.spark.master, spec.spark.conf), buffer_mb=spec.spark.buffer_mb
        )
    group = spec.strategy.group_column()
    train = source_for(spec.data, base, groups=group)
    held = spec.validation
    if held is not None and group is not None and held.features is None:
        # the training features, without the id column the inferred ones would hold
        held = held.model_copy(update={"features": getattr(train, "features", None)})
    validation = source_for(held, base) if held is not None else None
    return trainer, train, validation


def _data_spec(
    data: Any, features: list[str] | None, label: str | None, path: Path, group: str | None
) -> dict[str, Any]:
    """`data` as a job's `DataSpec`: a Parquet path as it is, ``(X, y)`` arrays or a
    pandas DataFrame written to `path` (with the strategy's `group` column, not a feature)."""
    if isinstance(data, str | Path):
        if label is None:
            raise SpecError("label: name the label column of the Parquet data")
        return {"path": str(Path(data).resolve()), "features": features, "label": label}
    if isinstance(data, pd.DataFrame):
        if label is None:
            raise SpecError("label: name the label column of the DataFrame")
        features = features or [c for c in data.columns if c not in (label, group)]
        data[[*features, label, *([group] if group is not None else [])]].to_parquet(path)
        return {"path": str(path), "features": features, "label": label}
    if isinstance(data, tuple) and len(data) == 2:
        x, y = (np.asarray(a) for a in data)
        frame = pd.DataFrame(x.reshape(len(x), -1), columns=None)
        frame.columns = [f"x{i}" for i in range(frame.shape[1])]
        frame["label"] = y
        frame.to_parquet(path)
        return {"path": str(path), "features": list(frame.columns[:-1]), "label": "label"}
    raise SpecError(
        "data: a search of a Trainer takes (X, y) arrays, a pandas DataFrame or a Parquet "
        f"path, not {type(data).__name__}"
    )


def job_of_trainer(
    trainer: Trainer,
    data: Any,
    *,
    folder: Path,
    features: list[str] | None = None,
    label: str | None = None,
    validation: Any = None,
) -> dict[str, Any]:
    """The job spec (a mapping) that trains as `trainer.fit(data, ...)` does, its Python
    parts pickled in ``folder/trainer.pkl`` and its arrays written in `folder`.

    An optimizer given as a `corral.OptimizerSpec` stays a spec, so a space can vary
    ``optimizer.lr``; any other callable travels pickled, its settings out of reach.

    Raises:
        SpecError: a trainer on an engine other than the local one, or data of a kind a
            job cannot hold.
    """
    if not isinstance(trainer.engine, LocalEngine):
        raise SpecError("engine: a search of a Trainer runs its trials on the local engine")
    folder.mkdir(parents=True, exist_ok=True)
    parts: dict[str, Any] = {"model": trainer.model, "loss": trainer.loss}
    pickled = folder.resolve() / "trainer.pkl"
    spec = trainer.settings.model_dump(mode="json", exclude_unset=True)
    spec.pop("master_port", None)  # trials run side by side: each takes a free one
    spec.get("checkpoint", {}).pop("dir", None)  # each trial's job keeps its own
    spec |= {"entrypoint": f"{pickled}:model", "loss": f"{pickled}:loss"}
    if isinstance(trainer.optimizer, OptimizerSpec):
        spec["optimizer"] = trainer.optimizer.model_dump(mode="json")
    elif trainer.optimizer is not None:
        parts["optimizer"] = trainer.optimizer
        spec["optimizer"] = f"{pickled}:optimizer"
    pickled.write_bytes(cloudpickle.dumps(parts))
    group = trainer.settings.strategy.group_column()
    train = folder.resolve() / "train.parquet"
    spec["data"] = _data_spec(data, features, label, train, group)
    if validation is not None:
        path = folder.resolve() / "validation.parquet"
        held = features or spec["data"]["features"]  # the training features, not the ids
        spec["validation"] = _data_spec(validation, held, label, path, None)
    return spec
