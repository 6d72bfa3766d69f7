"""Trained models back in Spark: a prediction column and a SQL function, on local[2]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blobs

import corral
from corral.errors import DataError

pytestmark = [pytest.mark.slow, pytest.mark.spark]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import pandas as pd

    x, y = blobs(400)
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": y})
    trainer = corral.Trainer(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ),
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        workers=1,
        epochs=2,
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
    )
    return trainer.fit(frame, features=["a", "b"], label="y", on_report=None), frame


def expected(model: torch.nn.Module, frame) -> list[int]:
    with torch.no_grad():
        x = torch.from_numpy(frame[["a", "b"]].to_numpy(np.float32).copy())
        return model(x).argmax(dim=1).tolist()


def test_model_udf_adds_the_models_predictions(spark, trained):
    result, frame = trained
    assert result.features == ["a", "b"]
    df = spark.createDataFrame(frame.assign(id=range(len(frame))))
    scored = result.model_udf(df).orderBy("id").toPandas()
    assert scored["prediction"].tolist() == expected(result.model, frame)
    assert list(scored.columns) == ["a", "b", "y", "id", "prediction"]


def test_register_makes_a_sql_function(spark, trained):
    result, frame = trained
    spark.createDataFrame(frame.assign(id=range(len(frame)))).createOrReplaceTempView("blobs")
    corral.spark.register(spark, "blob_class", result)
    rows = spark.sql("SELECT id, blob_class(a, b) AS c FROM blobs ORDER BY id").collect()
    assert [r.c for r in rows] == expected(result.model, frame)


def test_a_regression_model_predicts_doubles(spark):
    model = torch.nn.Linear(2, 1)
    df = spark.createDataFrame([(1.0, 2.0), (3.0, 4.0)], ["a", "b"])
    rows = corral.spark.model_udf(df, model, ["a", "b"], output="yhat").collect()
    with torch.no_grad():
        want = model(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))[:, 0].tolist()
    assert [r.yhat for r in rows] == pytest.approx(want, rel=1e-6)


def test_bad_feature_columns_are_named(spark, trained):
    result, _ = trained
    df = spark.createDataFrame([(1.0, "x")], ["a", "b"])
    with pytest.raises(DataError, match=r"column\(s\) b \(string\) are not numeric"):
        result.model_udf(df)
    with pytest.raises(DataError, match=r"column\(s\) c not in the DataFrame; it has a, b"):
        result.model_udf(df, features=["a", "c"])
