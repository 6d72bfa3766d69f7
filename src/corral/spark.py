"""Trained models back in Spark: batch inference as a column, or as a Spark SQL function.

``result.model_udf(df)`` adds a prediction column to a DataFrame, and
``corral.spark.register(spark, "churn_score", result)`` makes ``churn_score(f1, f2, …)``
callable from SQL. Both use one vectorised pandas UDF. Spark hands it whole Arrow
batches, the model scores each batch in one forward pass (no Python loop over rows), and
the model travels once, as a Spark broadcast, and is unpickled once per executor Python
worker.

A classifier (a 2-D output with more than one column) predicts the arg-max class as a
``long``; anything else predicts its output as a ``double``. A model of a classic kind
(`corral.classic`: XGBoost, LightGBM, scikit-learn) is scored the same way, through its
own ``predict``.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle
import numpy as np
import pandas as pd  # at module level: pyspark resolves the UDF's type hints against it
import torch

from corral.data.arrow import feature_matrix, label_vector
from corral.errors import DataError, SpecError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, Row, SparkSession

#: Models unpickled in this (executor) process, by the key `predict_udf` gave them.
_models: dict[str, Any] = {}

_NUMERIC = ("byte", "short", "int", "bigint", "long", "float", "double", "decimal", "boolean")


class _TorchScorer:
    """A PyTorch module scoring rows as a classic model does (`predict`)."""

    def __init__(self, module: torch.nn.Module, classifier: bool) -> None:
        self.module, self.classifier = module, classifier

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.module(torch.from_numpy(x))
        values = out.argmax(dim=1) if self.classifier else out.reshape(len(x), -1)[:, 0]
        return values.numpy()


def _scorer(model: Any, width: int) -> Any:
    """What the UDF scores with: a `corral.classic` model as it is (it has ``predict``
    and knows whether it is a ``classifier``), or a `corral.Result`'s or a bare module,
    as an eval-mode CPU copy that is a classifier if one forward pass on zeros gives a
    2-D output of more than one column."""
    if callable(getattr(model, "predict", None)) and hasattr(model, "classifier"):
        return model
    module = getattr(model, "model", model)
    if not isinstance(module, torch.nn.Module):
        raise SpecError(
            "expected a corral Result, a corral.classic model or an nn.Module, "
            f"got {type(model).__name__}"
        )
    module = copy.deepcopy(module).cpu().eval()
    with torch.no_grad():
        out = module(torch.zeros(1, width))
    return _TorchScorer(module, classifier=out.ndim == 2 and out.shape[1] > 1)


def _matrix(columns: tuple[pd.Series, ...]) -> np.ndarray:
    """Scalar columns and columns of equal-length arrays, side by side, as float32."""
    parts = [
        np.stack(c.to_numpy()) if c.dtype == object else c.to_numpy().reshape(-1, 1)
        for c in columns
    ]
    return np.hstack(parts).astype(np.float32, copy=False)


def predict_udf(spark: SparkSession, model: Any, width: int) -> Any:
    """A pandas UDF of numeric and array columns, `width` inputs in all, that returns
    `model`'s predictions: a classifier's class as a ``long``, else a ``double``."""
    from pyspark.sql.functions import pandas_udf

    scorer = _scorer(model, width)
    return_type = "long" if scorer.classifier else "double"
    shared = spark.sparkContext.broadcast(cloudpickle.dumps(scorer))
    key = uuid.uuid4().hex  # names this model in each executor's cache

    def predict(*columns: pd.Series) -> pd.Series:
        if key not in _models:
            _models[key] = cloudpickle.loads(shared.value)
        return pd.Series(_models[key].predict(_matrix(columns)))

    return pandas_udf(predict, return_type)  # type: ignore[call-overload]


def _features(model: Any, features: str | list[str] | None) -> list[str]:
    names = [features] if isinstance(features, str) else features
    names = names or getattr(model, "features", None)
    if not names:
        raise SpecError("features: name the model's input columns (it was trained on none)")
    return list(names)


def _kind(dtype: str) -> str | None:
    """``scalar``, ``array`` (of numbers) or ``vector`` (Spark ML), from a Spark type name."""
    if dtype.startswith(_NUMERIC):
        return "scalar"
    if dtype == "vector":
        return "vector"
    if dtype.startswith("array<") and dtype.removeprefix("array<").startswith(_NUMERIC):
        return "array"
    return None


def check_columns(df: DataFrame, features: list[str]) -> dict[str, str]:
    """Refuse missing or non-numeric feature columns, naming them and their types; returns
    each column's kind (`_kind`)."""
    types = dict(df.dtypes)
    missing = [f for f in features if f not in types]
    if missing:
        raise DataError(
            f"column(s) {', '.join(missing)} not in the DataFrame; it has {', '.join(types)}"
        )
    kinds = {f: _kind(types[f]) for f in features}
    wrong = [f"{f} ({types[f]})" for f, kind in kinds.items() if kind is None]
    if wrong:
        raise DataError(
            f"column(s) {', '.join(wrong)} are not numeric, nor arrays or vectors of numbers"
        )
    return {f: str(kind) for f, kind in kinds.items()}


def _inputs(kinds: dict[str, str]) -> list[Column]:
    """The feature columns as the model reads them: an ML vector becomes an array."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    return [
        vector_to_array(F.col(f)).alias(f) if kind == "vector" else F.col(f)
        for f, kind in kinds.items()
    ]


def _width(rows: Any, kinds: dict[str, str]) -> int:
    """How many inputs the features give, from `_array_sizes` aggregates in `rows`;
    refuses array columns whose rows differ in length."""
    width = 0
    for i, (f, kind) in enumerate(kinds.items()):
        if kind == "scalar":
            width += 1
            continue
        low, high = rows[f"min_size_{i}"], rows[f"max_size_{i}"]
        if low is None or low != high:
            raise DataError(
                f"feature column {f} holds arrays of different lengths ({low} to {high})"
            )
        width += int(low)
    return width


def _array_sizes(kinds: dict[str, str]) -> list[Column]:
    from pyspark.sql import functions as F

    sizes = []
    for i, (f, kind) in enumerate(kinds.items()):
        if kind != "scalar":
            sizes += [
                F.min(F.size(f)).alias(f"min_size_{i}"),
                F.max(F.size(f)).alias(f"max_size_{i}"),
            ]
    return sizes


@dataclass(frozen=True, kw_only=True)
class TrainingInput:
    """A Spark DataFrame to train on, narrowed to its columns and not yet read: `check`
    runs the one Spark job that reads it.

    Built by `prepare_input`; `training_input` is the two in a row. A caller with more to
    learn of the rows (a classifier's classes) adds its aggregates to that same job.
    """

    df: DataFrame
    features: list[str]
    label: str
    kinds: dict[str, str]
    missing_features: bool

    def check(self, workers: int, *also: Column) -> tuple[int, Row]:
        """Count the rows, the null or NaN labels and (unless missing features are
        allowed) the null or NaN features, and measure array columns, in one Spark job
        that also computes `also`; nothing is collected but one row.

        Returns:
            How many inputs the features give, and the job's row (`also` by alias).

        Raises:
            DataError: no rows, fewer than `workers`, null or NaN labels or features, or
                array columns of different lengths.
        """
        from pyspark.sql import functions as F

        types, label = dict(self.df.dtypes), self.label

        def nan(c: str) -> Column:  # NaN, in a floating-point column
            return F.isnan(c) if types[c] in ("float", "double") else F.lit(False)

        def bad(c: str) -> Column:
            return F.sum((F.col(c).isNull() | nan(c)).cast("int"))

        scalars = [f for f in self.features if self.kinds[f] == "scalar"]
        checked = {} if self.missing_features else {f"bad_{i}": f for i, f in enumerate(scalars)}
        counts = self.df.agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum(F.col(label).isNull().cast("int")).alias("nulls"),
            F.sum(nan(label).cast("int")).alias("nans"),
            *[bad(f).alias(key) for key, f in checked.items()],
            *_array_sizes(self.kinds),
            *also,
        ).first()
        if counts is None or counts["rows"] == 0:
            raise DataError("the DataFrame has no rows")
        rows, nulls, nans = counts["rows"], counts["nulls"] or 0, counts["nans"] or 0
        if nulls:
            raise DataError(f"label column {label} has {nulls} null value(s) in {rows} rows")
        if nans:
            raise DataError(f"label column {label} has {nans} NaN value(s) in {rows} rows")
        listed = ", ".join(f"{f} ({counts[key]})" for key, f in checked.items() if counts[key])
        if listed:
            raise DataError(f"feature column(s) with null or NaN values in {rows} rows: {listed}")
        if rows < workers:
            raise DataError(f"the DataFrame has {rows} rows, fewer than the {workers} workers")
        return _width(counts, self.kinds), counts


def prepare_input(
    df: DataFrame,
    features: str | list[str] | None,
    label: str | None,
    *,
    missing_features: bool = False,
) -> TrainingInput:
    """Check a Spark DataFrame's columns to train on (no Spark job): the features
    (default: every column but the label) numbers, arrays of numbers or ML vectors (read
    as arrays), the label one number per row.

    Args:
        missing_features: let null and NaN features through (a model that takes them as
            missing values, as XGBoost does); by default they are refused.
    """
    if label is None:
        raise DataError("label= is required for a Spark DataFrame: name the column")
    names = [features] if isinstance(features, str) else features
    names = names or [c for c in df.columns if c != label]
    kinds = check_columns(df, names)
    if _kind(dict(df.dtypes).get(label, "")) != "scalar":
        check_columns(df, [label])
        raise DataError(f"label column {label} must hold one number per row")
    return TrainingInput(
        df=df.select(*_inputs(kinds), label),
        features=names,
        label=label,
        kinds=kinds,
        missing_features=missing_features,
    )


def training_input(
    df: DataFrame,
    features: str | list[str] | None,
    label: str | None,
    workers: int,
    *,
    missing_features: bool = False,
) -> tuple[DataFrame, list[str], int]:
    """Check a Spark DataFrame to train on; returns it narrowed to its columns (ML vectors
    as arrays), the feature names (default: every column but the label), and how many
    inputs they give.

    One Spark job (`TrainingInput.check`) counts the rows, the null or NaN labels and
    features, and measures array columns; nothing is collected.

    Args:
        missing_features: let null and NaN features through (see `prepare_input`).
    """
    prepared = prepare_input(df, features, label, missing_features=missing_features)
    width, _ = prepared.check(workers)
    return prepared.df, prepared.features, width


def held_out(df: DataFrame, features: list[str], label: str) -> tuple[np.ndarray, np.ndarray]:
    """Validation data in a Spark DataFrame, collected to the driver as ``(x, y)`` arrays
    through Arrow (it is scored on the driver, so it is meant to be small)."""
    kinds = check_columns(df, features)
    check_columns(df, [label])
    table = df.select(*_inputs(kinds), label).toArrow()
    return feature_matrix(table, features), label_vector(table, label)


def model_udf(
    df: DataFrame,
    model: Any,
    features: str | list[str] | None = None,
    output: str = "prediction",
) -> DataFrame:
    """`df` with a column `output` of `model`'s predictions from the `features` columns
    (numbers, arrays of numbers or ML vectors)."""
    names = _features(model, features)
    kinds = check_columns(df, names)
    inputs, sizes = _inputs(kinds), _array_sizes(kinds)
    width = _width(df.select(*inputs).agg(*sizes).first(), kinds) if sizes else len(names)
    udf = predict_udf(df.sparkSession, model, width)
    column: Column = udf(*inputs)
    return df.withColumn(output, column)


def register(
    spark: SparkSession, name: str, model: Any, features: str | list[str] | None = None
) -> None:
    """Make ``name(f1, f2, …)`` a Spark SQL function returning `model`'s predictions.

    Its arguments are numeric columns, or arrays of numbers (SQL cannot pass an ML
    vector to a Python function: convert it with ``vector_to_array`` first).

    Example:
        >>> corral.spark.register(spark, "churn_score", result)
        >>> spark.sql("SELECT id, churn_score(f1, f2, f3) FROM customers")
    """
    width = getattr(model, "width", None) or len(_features(model, features))
    spark.udf.register(name, predict_udf(spark, model, width))
