"""corral: distributed PyTorch training on shared clusters.

Example:
    >>> import corral
    >>> result = corral.Trainer(model=make_model, loss=torch.nn.CrossEntropyLoss(),
    ...                         optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
    ...                         strategy=corral.AllReduce(), workers=4).fit((X, y))
"""

from corral.errors import (
    CheckpointError,
    CorralError,
    DataError,
    LaunchError,
    SpecError,
    WorkerError,
)
from corral.spec import JobSpec, OptimizerSpec, TrainSettings, load_spec
from corral.strategies import AllReduce, Averaging, Strategy
from corral.train.context import Context, context
from corral.train.launcher import run
from corral.train.trainer import Result, Trainer

__all__ = [
    "AllReduce",
    "Averaging",
    "CheckpointError",
    "Context",
    "CorralError",
    "DataError",
    "JobSpec",
    "LaunchError",
    "OptimizerSpec",
    "Result",
    "SpecError",
    "Strategy",
    "TrainSettings",
    "Trainer",
    "WorkerError",
    "context",
    "load_spec",
    "run",
]
