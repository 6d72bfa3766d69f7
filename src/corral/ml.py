"""corral's trainer as a Spark ML ``Estimator``, so it composes with MLlib.

``TorchEstimator(model=make_model, ...)`` is a `pyspark.ml.Estimator`: ``fit(df)`` trains
on the DataFrame where it lies (the workers are tasks of a barrier stage, each reading
its partition, as ``Trainer.fit(df)`` on the Spark engine does) and returns a
``TorchModel``, a `pyspark.ml.Model` whose ``transform(df)`` adds the prediction column
(scored in whole Arrow batches on the executors, `corral.spark`). So it sits in a
`Pipeline` after a ``VectorAssembler`` (a vector column is taken as its elements), and
MLlib's ``CrossValidator`` and ``TrainValidationSplit`` tune its params (``lr``,
``epochs``, ``batchSize``, ``workers``, ``momentum``) with a ``ParamGridBuilder``.

A classifier's prediction is its arg-max class as a ``double`` (what MLlib's evaluators
read); a regressor's, its output.

Example:
    >>> est = TorchEstimator(model=make_model, featuresCol="features", labelCol="y")
    >>> model = Pipeline(stages=[VectorAssembler(...), est]).fit(train_df)
    >>> model.transform(test_df).select("prediction")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasFeaturesCol, HasLabelCol, HasPredictionCol

if TYPE_CHECKING:
    import torch
    from pyspark.sql import DataFrame

    from corral.strategies import Strategy
    from corral.train.trainer import Result


class _TorchParams(HasFeaturesCol, HasLabelCol, HasPredictionCol):
    """The params MLlib's tuning can vary; the model, loss and strategy are Python
    objects, kept on the estimator (and copied with it) rather than as params."""

    lr = Param(Params._dummy(), "lr", "the optimizer's learning rate", TypeConverters.toFloat)
    momentum = Param(Params._dummy(), "momentum", "SGD's momentum", TypeConverters.toFloat)
    epochs = Param(Params._dummy(), "epochs", "epochs to train", TypeConverters.toInt)
    batchSize = Param(
        Params._dummy(), "batchSize", "samples per worker per step", TypeConverters.toInt
    )
    workers = Param(Params._dummy(), "workers", "worker tasks", TypeConverters.toInt)

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(
            lr=0.01, momentum=0.0, epochs=1, batchSize=32, workers=1, predictionCol="prediction"
        )


class TorchEstimator(Estimator, _TorchParams):  # type: ignore[misc]
    """A torch model factory trained by corral on a Spark DataFrame (see the module)."""

    def __init__(
        self,
        *,
        model: Callable[[], torch.nn.Module],
        loss: Callable[..., torch.Tensor] | None = None,
        strategy: Strategy | str | None = None,
        checkpoint_dir: str | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        self.model_factory, self.loss, self.strategy = model, loss, strategy
        self.checkpoint_dir = checkpoint_dir
        self._set(**params)

    def _fit(self, dataset: DataFrame) -> TorchModel:
        import torch

        from corral.engines.spark import SparkEngine
        from corral.spec import OptimizerSpec
        from corral.strategies import AllReduce
        from corral.train.trainer import Trainer

        get = self.getOrDefault
        trainer = Trainer(
            model=self.model_factory,
            loss=self.loss or torch.nn.CrossEntropyLoss(),
            optimizer=OptimizerSpec(lr=get(self.lr), momentum=get(self.momentum)),
            strategy=self.strategy or AllReduce(),
            workers=get(self.workers),
            epochs=get(self.epochs),
            batch_size=get(self.batchSize),
            checkpoint_dir=self.checkpoint_dir,
            engine=SparkEngine(dataset.sparkSession),
        )
        result = trainer.fit(
            dataset, features=self.getFeaturesCol(), label=self.getLabelCol(), on_report=None
        )
        return self._copyValues(TorchModel(result))


class TorchModel(Model, _TorchParams):  # type: ignore[misc]
    """A model `TorchEstimator` trained: ``transform`` adds its predictions."""

    def __init__(self, result: Result) -> None:
        super().__init__()
        self.result = result

    def _transform(self, dataset: DataFrame) -> DataFrame:
        from pyspark.sql import functions as f

        column = self.getPredictionCol()
        scored = self.result.model_udf(dataset, self.getFeaturesCol(), column)
        return scored.withColumn(column, f.col(column).cast("double"))
