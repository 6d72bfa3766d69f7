"""corral's trainer as a Spark ML Estimator on local[2]: in a Pipeline after a
VectorAssembler, and tuned by MLlib's own CrossValidator."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs

pytestmark = [pytest.mark.slow, pytest.mark.spark]


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


@pytest.fixture(scope="module")
def frame(spark):
    import pandas as pd

    x, y = blobs(400)
    return spark.createDataFrame(pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": y}))


def stages(tmp_path, **params):
    from pyspark.ml.feature import VectorAssembler

    from corral.ml import TorchEstimator

    assembler = VectorAssembler(inputCols=["a", "b"], outputCol="features")
    estimator = TorchEstimator(
        model=make_model,
        checkpoint_dir=str(tmp_path),
        featuresCol="features",
        labelCol="y",
        **params,
    )
    return assembler, estimator


def evaluator():
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator

    return MulticlassClassificationEvaluator(labelCol="y", metricName="accuracy")


def test_mllibs_cross_validator_tunes_it_in_a_pipeline(frame, tmp_path):
    """Five fits (two values × two folds, then the best on all the data), each a barrier
    stage; the best pipeline then predicts as an MLlib model does."""
    from pyspark.ml import Pipeline
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

    assembler, estimator = stages(tmp_path, epochs=2)
    grid = ParamGridBuilder().addGrid(estimator.lr, [1e-5, 0.3]).build()
    search = CrossValidator(
        estimator=Pipeline(stages=[assembler, estimator]),
        estimatorParamMaps=grid,
        evaluator=evaluator(),
        numFolds=2,
        seed=0,
    ).fit(frame)
    low, high = search.avgMetrics
    assert high > 0.9 > low  # lr 1e-5 barely moves from its start in 2 epochs
    best = search.bestModel.stages[-1]
    assert (best.getOrDefault("lr"), best.getOrDefault("epochs")) == (0.3, 2)
    scored = search.bestModel.transform(frame)
    assert dict(scored.dtypes)["prediction"] == "double" and scored.count() == 400
    assert evaluator().evaluate(scored) > 0.9
