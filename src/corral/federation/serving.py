"""Which aggregator serves a job to real clients: the one place that decides."""

from __future__ import annotations

from pathlib import Path

from corral.errors import SpecError
from corral.federation.aggregator import Aggregator
from corral.federation.wire import JoinAddress
from corral.spec import Federation, JobSpec
from corral.strategies.fedbuff import FedBuff


def aggregator_for(
    spec: JobSpec,
    *,
    base: Path,
    folder: Path,
    settings: Federation | None = None,
    parent: JoinAddress | None = None,
) -> Aggregator:
    """An edge under `parent` if given; for `FedBuff`, the buffered asynchronous one;
    else the aggregator of synchronous rounds."""
    buffered = isinstance(spec.strategy, FedBuff)
    if parent is not None:
        if buffered:
            raise SpecError("strategy: an edge serves synchronous rounds; FedBuff runs at the root")
        from corral.federation.edge import Edge

        return Edge(spec, base=base, folder=folder, parent=parent, settings=settings)
    if buffered:
        from corral.federation.buffered import BufferedAggregator

        return BufferedAggregator(spec, base=base, folder=folder, settings=settings)
    return Aggregator(spec, base=base, folder=folder, settings=settings)
