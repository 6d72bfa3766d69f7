"""corral: distributed PyTorch training on shared clusters.

Example:
    >>> import corral
    >>> result = corral.Trainer(model=make_model, loss=torch.nn.CrossEntropyLoss(),
    ...                         optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
    ...                         strategy=corral.AllReduce(), workers=4).fit((X, y))

Names are imported on first use (PEP 562), so a worker process that needs only
`corral.context` does not pay for pandas, pyarrow and pydantic at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AllReduce": "corral.strategies",
    "Averaging": "corral.strategies",
    "CheckpointError": "corral.errors",
    "Context": "corral.runtime.context",
    "CorralError": "corral.errors",
    "DataError": "corral.errors",
    "FedAdagrad": "corral.strategies",
    "FedAdam": "corral.strategies",
    "FedAvg": "corral.strategies",
    "FedBuff": "corral.strategies",
    "FedProx": "corral.strategies",
    "FedYogi": "corral.strategies",
    "Gossip": "corral.strategies",
    "JobSpec": "corral.spec",
    "LaunchError": "corral.errors",
    "MLflow": "corral.spec",
    "OptimizerSpec": "corral.spec",
    "ParameterServer": "corral.strategies",
    "Result": "corral.train.trainer",
    "SearchFailed": "corral.service.tuning",
    "SparkEngine": "corral.engines.spark",
    "SpecError": "corral.errors",
    "Strategy": "corral.strategies",
    "TrainSettings": "corral.spec",
    "Trainer": "corral.train.trainer",
    "TrainingError": "corral.errors",
    "WorkerError": "corral.errors",
    "context": "corral.runtime.context",
    "load_spec": "corral.spec",
    "run": "corral.train.launcher",
    "tune": "corral.service.tuning",
}

__all__ = [
    "AllReduce",
    "Averaging",
    "CheckpointError",
    "Context",
    "CorralError",
    "DataError",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedBuff",
    "FedProx",
    "FedYogi",
    "Gossip",
    "JobSpec",
    "LaunchError",
    "MLflow",
    "OptimizerSpec",
    "ParameterServer",
    "Result",
    "SearchFailed",
    "SparkEngine",
    "SpecError",
    "Strategy",
    "TrainSettings",
    "Trainer",
    "TrainingError",
    "WorkerError",
    "context",
    "load_spec",
    "run",
    "tune",
]


#: Submodules reachable as attributes without importing them first (``corral.spark.register``,
#: ``corral.classic.fit``).
_SUBMODULES = ("classic", "federated", "spark")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"corral.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'corral' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from corral.engines.spark import SparkEngine
    from corral.errors import (
        CheckpointError,
        CorralError,
        DataError,
        LaunchError,
        SpecError,
        TrainingError,
        WorkerError,
    )
    from corral.runtime.context import Context, context
    from corral.service.tuning import SearchFailed, tune
    from corral.spec import JobSpec, MLflow, OptimizerSpec, TrainSettings, load_spec
    from corral.strategies import (
        AllReduce,
        Averaging,
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedBuff,
        FedProx,
        FedYogi,
        Gossip,
        ParameterServer,
        Strategy,
    )
    from corral.train.launcher import run
    from corral.train.trainer import Result, Trainer
