"""Federated learning's math, apart from any process: how client updates are partitioned,
aggregated (weighted, robust), applied by a server optimizer, securely summed and kept
differentially private.

The strategies that run rounds (`corral.strategies.fedavg` and its variants) call these;
nothing here knows about workers, process groups or the service.
"""

from corral.federated.aggregation import Krum, Mean, Median, TrimmedMean
from corral.federated.partition import IID, ClientColumn, Dirichlet, LabelShards
from corral.federated.privacy import Privacy
from corral.federated.secure import SecureAggregation

__all__ = [
    "IID",
    "ClientColumn",
    "Dirichlet",
    "Krum",
    "LabelShards",
    "Mean",
    "Median",
    "Privacy",
    "SecureAggregation",
    "TrimmedMean",
]
