"""One worker's push to one server: its slice of the dense gradient, plus touched table rows.

Sparse embedding tables (``nn.Embedding(..., sparse=True)``) send only the rows a batch
touched: for each table, the row numbers (local to the server's row range) and their
gradient rows. On the wire a push is ``[dense, rows_0, values_0, rows_1, values_1, …]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gradient:
    """A dense slice and, per sparse table, ``(rows, values)`` (rows may repeat)."""

    dense: np.ndarray
    rows: tuple[tuple[np.ndarray, np.ndarray], ...] = ()

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray]) -> Gradient:
        if len(arrays) % 2 != 1:
            raise ValueError(f"a push has a dense part and row/value pairs, got {len(arrays)}")
        pairs = zip(arrays[1::2], arrays[2::2], strict=True)
        return cls(arrays[0], tuple((rows, values) for rows, values in pairs))

    def arrays(self) -> list[np.ndarray]:
        return [self.dense, *(a for pair in self.rows for a in pair)]

    @staticmethod
    def mean(gradients: list[Gradient]) -> Gradient:
        """The group's mean: dense parts averaged, rows gathered with values divided by n.

        Rows touched by several workers appear once per worker; applying them with
        accumulation (as a sparse tensor does) sums them, which makes this the mean.
        """
        n = len(gradients)
        dense = np.mean([g.dense for g in gradients], axis=0)
        rows = tuple(
            (
                np.concatenate([g.rows[t][0] for g in gradients]),
                np.concatenate([g.rows[t][1] for g in gradients]) / np.float32(n),
            )
            for t in range(len(gradients[0].rows))
        )
        return Gradient(dense, rows)
