"""Trained models back in Spark: batch inference as a column, or as a Spark SQL function.

``result.model_udf(df)`` adds a prediction column to a DataFrame, and
``corral.spark.register(spark, "churn_score", result)`` makes ``churn_score(f1, f2, …)``
callable from SQL. Both use one vectorised pandas UDF. Spark hands it whole Arrow
batches, the model scores each batch in one forward pass (no Python loop over rows), and
the model travels once, as a Spark broadcast, and is unpickled once per executor Python
worker.

A classifier (a 2-D output with more than one column) predicts the arg-max class as a
``long``; anything else predicts its output as a ``double``.
"""

from __future__ import annotations

import copy
import uuid
from typing import TYPE_CHECKING, Any

import cloudpickle
import numpy as np
import pandas as pd  # at module level: pyspark resolves the UDF's type hints against it
import torch

from corral.errors import DataError, SpecError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

#: Models unpickled in this (executor) process, by the key `predict_udf` gave them.
_models: dict[str, torch.nn.Module] = {}

_NUMERIC = ("byte", "short", "int", "bigint", "long", "float", "double", "decimal", "boolean")


def _model_of(model: Any) -> torch.nn.Module:
    """The module of a `corral.Result` or a module itself, as an eval-mode CPU copy."""
    module = getattr(model, "model", model)
    if not isinstance(module, torch.nn.Module):
        raise SpecError(f"expected a corral Result or an nn.Module, got {type(model).__name__}")
    return copy.deepcopy(module).cpu().eval()


def _return_type(model: torch.nn.Module, n_features: int) -> str:
    """``long`` for a classifier, ``double`` otherwise, from one forward pass on zeros."""
    with torch.no_grad():
        out = model(torch.zeros(1, n_features))
    return "long" if out.ndim == 2 and out.shape[1] > 1 else "double"


def predict_udf(spark: SparkSession, model: Any, n_features: int) -> Any:
    """A pandas UDF of `n_features` numeric columns that returns `model`'s predictions."""
    from pyspark.sql.functions import pandas_udf

    module = _model_of(model)
    return_type = _return_type(module, n_features)
    shared = spark.sparkContext.broadcast(cloudpickle.dumps(module))
    key = uuid.uuid4().hex  # names this model in each executor's cache

    def predict(*columns: pd.Series) -> pd.Series:
        if key not in _models:
            _models[key] = cloudpickle.loads(shared.value)
        x = np.column_stack([c.to_numpy(dtype=np.float32) for c in columns])
        with torch.no_grad():
            out = _models[key](torch.from_numpy(x))
        values = out.argmax(dim=1) if return_type == "long" else out.reshape(len(x), -1)[:, 0]
        return pd.Series(values.numpy())

    return pandas_udf(predict, return_type)  # type: ignore[call-overload]


def _features(model: Any, features: list[str] | None) -> list[str]:
    names = features or getattr(model, "features", None)
    if not names:
        raise SpecError(
            "features: name the model's input columns, in training order "
            "(the model was not trained on named columns)"
        )
    return list(names)


def check_columns(df: DataFrame, features: list[str]) -> None:
    """Refuse missing or non-numeric columns, naming them and their types."""
    types = dict(df.dtypes)
    missing = [f for f in features if f not in types]
    if missing:
        raise DataError(
            f"column(s) {', '.join(missing)} not in the DataFrame; it has {', '.join(types)}"
        )
    wrong = [f"{f} ({types[f]})" for f in features if not types[f].startswith(_NUMERIC)]
    if wrong:
        raise DataError(f"column(s) {', '.join(wrong)} are not numeric")


def training_input(
    df: DataFrame, features: list[str] | None, label: str | None, workers: int
) -> tuple[DataFrame, list[str]]:
    """Check a Spark DataFrame to train on; returns it narrowed to its columns, and the
    feature names (default: every column but the label).

    One Spark job counts the rows and the null labels; nothing is collected.
    """
    from pyspark.sql import functions as F

    if label is None:
        raise DataError("label= is required for a Spark DataFrame: name the column")
    names = features or [c for c in df.columns if c != label]
    check_columns(df, [*names, label])
    counts = df.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.col(label).isNull().cast("int")).alias("nulls"),
    ).first()
    rows, nulls = (counts["rows"], counts["nulls"] or 0) if counts else (0, 0)
    if rows == 0:
        raise DataError("the DataFrame has no rows")
    if nulls:
        raise DataError(f"label column {label} has {nulls} null value(s) in {rows} rows")
    if rows < workers:
        raise DataError(f"the DataFrame has {rows} rows, fewer than the {workers} workers")
    return df.select(*names, label), names


def model_udf(
    df: DataFrame, model: Any, features: list[str] | None = None, output: str = "prediction"
) -> DataFrame:
    """`df` with a column `output` of `model`'s predictions from the `features` columns."""
    names = _features(model, features)
    check_columns(df, names)
    udf = predict_udf(df.sparkSession, model, len(names))
    column: Column = udf(*names)
    return df.withColumn(output, column)


def register(spark: SparkSession, name: str, model: Any, features: list[str] | None = None) -> None:
    """Make ``name(f1, f2, …)`` a Spark SQL function returning `model`'s predictions.

    Example:
        >>> corral.spark.register(spark, "churn_score", result)
        >>> spark.sql("SELECT id, churn_score(f1, f2, f3) FROM customers")
    """
    spark.udf.register(name, predict_udf(spark, model, len(_features(model, features))))
