"""Classic machine learning as corral jobs: ``kind: xgboost``, ``kind: lightgbm`` and
``kind: sklearn``, with the PyTorch kind's roles, resources, scheduling, tracking and CLI.

`fit` runs a job of one of these kinds: it checks the kind's ``params`` against its
library (a typo is an error naming the closest parameter, not a warning), fits, saves the
model as ``model.pkl`` in `out`, and logs the run to MLflow when the spec asks. The model
(`ClassicModel`) scores NumPy rows, and `corral.spark.register` makes it a Spark SQL
function as it does a PyTorch model.

Each kind lives in a module of its own, imported only when a job of it runs, so that a
PyTorch job never pays for XGBoost or LightGBM.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from corral.classic.base import MODEL_FILE, ClassicModel, ClassicResult, Report
from corral.comm.control import Message
from corral.errors import SpecError
from corral.spec import ClassicSpec, JobSpec, load_spec, parse_job

__all__ = ["ClassicModel", "ClassicResult", "check", "fit"]

#: The module that runs each kind; each has ``check(spec, base)`` and
#: ``fit(spec, base, report) -> (ClassicModel, metrics)``.
_MODULES = {
    "xgboost": "corral.classic.xgboost",
    "lightgbm": "corral.classic.lightgbm",
    "sklearn": "corral.classic.sklearn",
}


def _spec_of(
    job: ClassicSpec | Mapping[str, Any] | str | Path, base: Path | None
) -> tuple[ClassicSpec, Path]:
    if isinstance(job, str | Path):
        spec, base = load_spec(job), base or Path(job).resolve().parent
    elif isinstance(job, Mapping):
        spec = parse_job(dict(job), source="job")
    else:
        spec = job
    if isinstance(spec, JobSpec):
        raise SpecError("kind: a torch job is trained with corral train or corral.Trainer")
    return spec, base or Path.cwd()


def _module(spec: ClassicSpec) -> Any:
    try:
        return importlib.import_module(_MODULES[spec.kind])
    except ImportError as exc:
        raise SpecError(
            f"kind: {spec.kind} needs {exc.name}, which is not installed here; "
            "pip install 'corral[classic]'"
        ) from None


def check(spec: ClassicSpec, *, base: Path) -> None:
    """Refuse what would fail the job as it starts: parameters the library does not
    know, an estimator that cannot be imported, a search space naming nothing.

    Raises:
        SpecError: in one line, naming the field.
    """
    _module(spec).check(spec, base=base)


def fit(
    job: ClassicSpec | Mapping[str, Any] | str | Path,
    *,
    base: Path | None = None,
    out: Path | None = None,
    on_report: Report | None = None,
) -> ClassicResult:
    """Fit a classic job, save its model, and return it with its metrics and the rows it
    reported (`on_report` gets each as it comes).

    Args:
        job: A YAML file of a classic kind, its spec, or a mapping of one.
        base: The folder its relative paths start from: default the YAML file's, else
            the current one.
        out: Where ``model.pkl`` goes: default ``./corral-runs/<name>-<time>``.

    Example:
        >>> result = corral.classic.fit({"kind": "xgboost", "rounds": 50,
        ...     "data": {"path": "train.parquet", "label": "y"}})
        >>> result.metrics["train_accuracy"], result.path
    """
    spec, base = _spec_of(job, base)
    if out is None:
        out = Path("corral-runs", f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    module = _module(spec)
    module.check(spec, base=base)
    tracker = None
    if spec.tracking is not None:
        from corral.train.tracking import Tracker

        tracker = Tracker.of_job(spec)
    history: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        history.append(row)
        if tracker is not None:
            tracker.report(
                Message(role="driver", rank=0, body={"metrics": row, "time": time.time()})
            )
        if on_report is not None:
            on_report(row)

    ok = False
    try:
        model, metrics = module.fit(spec, base=base, report=report)
        out.mkdir(parents=True, exist_ok=True)
        path = model.save(out / MODEL_FILE)
        ok = True
    finally:
        if tracker is not None:
            tracker.finish(ok=ok, settings=spec, artifacts=[out / MODEL_FILE] if ok else [])
    return ClassicResult(model=model, metrics=metrics, history=history, path=path)
