"""Federated jobs with real clients: an aggregator process (``corral fl serve``) and
clients on other processes or machines (``corral fl join``), over the parameter
server's encrypted transport. The simulation of the same strategies is
`corral.strategies.fedavg`; the math both use is `corral.federated`."""
