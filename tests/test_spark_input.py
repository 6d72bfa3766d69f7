"""corral.spark's checks of a DataFrame to train on (`training_input`, `prepare_input`), on
the session's local[2]: one Spark job, one-line errors."""

from __future__ import annotations

import pytest

from corral.errors import DataError
from corral.spark import prepare_input, training_input

pytestmark = pytest.mark.spark

NAN = float("nan")


@pytest.fixture(scope="module")
def missing(spark):
    """Three rows whose features a and v have a NaN and a null, and whose labels do not."""
    return spark.createDataFrame(
        [(1.0, [1.0, 2.0], 0), (NAN, [3.0, 4.0], 1), (None, [5.0, 6.0], 1)],
        "a double, v array<double>, y int",
    )


def test_null_and_nan_features_are_refused_by_default(missing):
    with pytest.raises(DataError) as caught:
        training_input(missing, None, "y", 2)
    assert str(caught.value) == "feature column(s) with null or NaN values in 3 rows: a (2)"


def test_missing_features_lets_them_through(missing):
    df, names, width = training_input(missing, None, "y", 2, missing_features=True)
    assert (names, width) == (["a", "v"], 3)
    assert df.count() == 3


@pytest.mark.parametrize("allowed", [False, True])
def test_a_nan_or_null_label_is_refused_either_way(spark, allowed):
    nan = spark.createDataFrame([(1.0, 0.0), (2.0, NAN)], "a double, y double")
    with pytest.raises(DataError) as caught:
        training_input(nan, None, "y", 1, missing_features=allowed)
    assert str(caught.value) == "label column y has 1 NaN value(s) in 2 rows"
    null = spark.createDataFrame([(1.0, 0), (2.0, None)], "a double, y int")
    with pytest.raises(DataError) as caught:
        training_input(null, None, "y", 1, missing_features=allowed)
    assert str(caught.value) == "label column y has 1 null value(s) in 2 rows"


def test_a_callers_aggregates_come_back_from_the_same_job(missing):
    from pyspark.sql import functions as F

    prepared = prepare_input(missing, ["a"], "y", missing_features=True)
    width, row = prepared.check(2, F.max("y").alias("top"))
    assert (prepared.features, width, row["rows"], row["top"]) == (["a"], 1, 3, 1)
