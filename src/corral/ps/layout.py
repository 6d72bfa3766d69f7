"""How a model's parameters are split over servers: equal contiguous ranges of one flat vector.

All parameters, flattened in a fixed order, form one virtual vector; server ``i`` owns the
``i``-th of ``n`` near-equal contiguous ranges of it (as ps-lite assigns key ranges, Li et
al., OSDI 2014). A large tensor thus spans several servers and small ones are packed
together, so every server holds the same number of elements, give or take one — balanced
for any model, which a tensor-per-server assignment (Angel's default) is not.

Embedding tables trained with sparse gradients are kept out of the flat vector: each is
split by rows into ``n`` near-equal contiguous row ranges, one per server, so a step moves
only the rows it touched (and a table with fewer rows than servers leaves some empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Server ``i`` owns flat elements ``bounds[i]:bounds[i + 1]``, and rows
    ``rows[t][i]:rows[t][i + 1]`` of sparse table ``t``."""

    bounds: tuple[int, ...]
    rows: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def split(cls, numel: int, servers: int, table_rows: Sequence[int] = ()) -> Layout:
        if servers < 1:
            raise ValueError(f"servers: must be at least 1, got {servers}")
        if numel < servers:
            raise ValueError(
                f"a model of {numel} parameters cannot be split over {servers} servers"
            )
        return cls(_edges(numel, servers), tuple(_edges(n, servers) for n in table_rows))

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

    def table_shard(self, table: np.ndarray, t: int, server: int) -> np.ndarray:
        """Server `server`'s rows of sparse table `t` (a view)."""
        return table[self.rows[t][server] : self.rows[t][server + 1]]

    def route(self, t: int, rows: np.ndarray) -> list[np.ndarray]:
        """For each server, the positions in `rows` (global row numbers of table `t`) it owns."""
        owner = np.searchsorted(self.rows[t], rows, side="right") - 1
        return [np.flatnonzero(owner == i) for i in range(self.servers)]


def _edges(n: int, parts: int) -> tuple[int, ...]:
    return tuple(int(e) for e in np.linspace(0, n, parts + 1).round().astype(np.int64))
