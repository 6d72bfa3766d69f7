"""Federated learning's math, apart from any process: how client updates are partitioned,
aggregated (weighted, robust), applied by a server optimizer, securely summed and kept
differentially private.

The strategies that run rounds (`corral.strategies.fedavg` and its variants) call these;
nothing here knows about workers, process groups or the service.
"""
