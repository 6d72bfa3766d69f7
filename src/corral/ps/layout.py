"""How a model's parameters are split over servers: equal contiguous ranges of one flat vector.

All parameters, flattened in a fixed order, form one virtual vector; server ``i`` owns the
``i``-th of ``n`` near-equal contiguous ranges of it (as ps-lite assigns key ranges, Li et
al., OSDI 2014). A large tensor thus spans several servers and small ones are packed
together, so every server holds the same number of elements, give or take one — balanced
for any model, which a tensor-per-server assignment (Angel's default) is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Server ``i`` owns flat elements ``bounds[i]:bounds[i + 1]``."""

    bounds: tuple[int, ...]

    @classmethod
    def split(cls, numel: int, servers: int) -> Layout:
        if servers < 1:
            raise ValueError(f"servers: must be at least 1, got {servers}")
        if numel < servers:
            raise ValueError(
                f"a model of {numel} parameters cannot be split over {servers} servers"
            )
        edges = np.linspace(0, numel, servers + 1).round().astype(np.int64)
        return cls(tuple(int(e) for e in edges))

    @property
    def servers(self) -> int:
        return len(self.bounds) - 1

    @property
    def numel(self) -> int:
        return self.bounds[-1]

    def shard(self, flat: np.ndarray, server: int) -> np.ndarray:
        """Server `server`'s part of a flat vector (a view, no copy)."""
        return flat[self.bounds[server] : self.bounds[server + 1]]

    def sizes(self) -> list[int]:
        return [hi - lo for lo, hi in zip(self.bounds, self.bounds[1:], strict=False)]
