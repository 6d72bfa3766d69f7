"""Distribution strategies: one module per algorithm, one small interface for all."""

from typing import Annotated

from pydantic import Field

from corral.strategies.allreduce import AllReduce
from corral.strategies.averaging import Averaging
from corral.strategies.base import (
    Batch,
    DataParallel,
    Replica,
    RoundReplica,
    RoundTotals,
    StepResult,
    Strategy,
    StrategyPlan,
    Supervisor,
)
from corral.strategies.fedavg import FedAvg
from corral.strategies.fedbuff import FedBuff
from corral.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from corral.strategies.fedprox import FedProx
from corral.strategies.gossip import Gossip
from corral.strategies.parameter_server import ParameterServer

#: The tagged union the job spec uses; add each new strategy class here.
AnyStrategy = Annotated[
    AllReduce
    | Averaging
    | Gossip
    | ParameterServer
    | FedAvg
    | FedProx
    | FedAdam
    | FedYogi
    | FedAdagrad
    | FedBuff,
    Field(discriminator="kind"),
]

__all__ = [
    "AllReduce",
    "AnyStrategy",
    "Averaging",
    "Batch",
    "DataParallel",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedBuff",
    "FedProx",
    "FedYogi",
    "Gossip",
    "ParameterServer",
    "Replica",
    "RoundReplica",
    "RoundTotals",
    "StepResult",
    "Strategy",
    "StrategyPlan",
    "Supervisor",
]
