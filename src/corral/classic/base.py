"""What every classic-ML kind shares: the fitted model, its result, the data as arrays,
and the checking of a kind's ``params`` against its library.

A kind reports its progress as rows of the same shape a PyTorch epoch reports
(``{"kind": "epoch", "epoch": r, "epochs": n, <metric>: value}``), one per boosting round,
so the service's metrics file, the job page's charts, MLflow tracking and a search's
pruners read a boosted model's rounds as they read a network's epochs.
"""

from __future__ import annotations

import difflib
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from corral.errors import SpecError
from corral.spec import DataSpec

#: Where a kind's progress goes: one epoch-shaped row per call.
Report = Callable[[dict[str, Any]], None]

#: The file a classic job's model is saved to, in its output folder.
MODEL_FILE = "model.pkl"


@dataclass
class ClassicModel:
    """A fitted model of a classic kind, with what scoring it needs.

    Attributes:
        estimator: An object with scikit-learn's ``predict(x)`` (an sklearn estimator,
            ``xgboost.XGBClassifier``, ``lightgbm.LGBMRegressor``…).
        features: The columns it was trained on, in order.
        classifier: Whether it predicts classes (a ``long``) rather than values.
        kind: The job kind that made it.
    """

    estimator: Any
    features: list[str]
    classifier: bool
    kind: str

    @property
    def width(self) -> int:
        """How many inputs it takes (`corral.spark.register` asks)."""
        return len(self.features)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Classes as int64, or values as float64, for the rows of `x`."""
        out = np.asarray(self.estimator.predict(x))
        return out.astype(np.int64) if self.classifier else out.astype(np.float64)

    def save(self, path: Path) -> Path:
        """Pickle it to `path` (written whole or not at all); returns `path`."""
        partial = path.with_name(f"{path.name}.partial")
        partial.write_bytes(pickle.dumps(self))
        partial.replace(path)
        return path

    @staticmethod
    def load(path: str | Path) -> ClassicModel:
        """The model a classic job saved (its ``model.pkl``)."""
        model = pickle.loads(Path(path).read_bytes())
        if not isinstance(model, ClassicModel):
            raise SpecError(f"{path} holds no corral model")
        return model


@dataclass
class ClassicResult:
    """What fitting a classic job returns.

    Attributes:
        model: The fitted model (the best one, for a search).
        metrics: The final metrics (``val_accuracy``, ``cv_score``, …).
        history: The rows it reported, in order.
        path: Where the model was saved.
    """

    model: ClassicModel
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None


def read_arrays(
    data: DataSpec, base: Path, *, missing_features: bool = False
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A Parquet dataset as whole ``(x, y)`` arrays and its feature names, checked as the
    PyTorch trainer checks it (missing or non-numeric columns, NaN, nulls), but with
    `missing_features` null and NaN features pass, as NaN (XGBoost's missing values)."""
    from corral.data.parquet import ParquetSource

    path = Path(data.path)
    source = ParquetSource(
        path if path.is_absolute() else base / path,
        label=data.label,
        features=data.features,
        missing_features=missing_features,
    )
    x, y = source.arrays()
    return x, y, source.features


def check_names(given: Iterable[str], known: Iterable[str], *, where: str, library: str) -> None:
    """Refuse a parameter the library does not know, naming the closest one it does (a
    typo would otherwise be ignored with a warning, or not at all)."""
    known = sorted(set(known))
    for name in given:
        if name not in known:
            near = difflib.get_close_matches(name, known, 1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise SpecError(f"{where}.{name}: not a parameter of {library}{hint}")


def epoch_row(epoch: int, epochs: int, metrics: dict[str, float]) -> dict[str, Any]:
    """A report in the shape a PyTorch epoch's has."""
    return {"kind": "epoch", "epoch": epoch, "epochs": epochs, **metrics}
