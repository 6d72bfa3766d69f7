"""A Spark partition as training data: an Arrow IPC file its barrier task spilled locally.

On the Spark engine, each worker's task receives its partition of the DataFrame as Arrow
record batches (``mapInArrow``) and writes them, one batch at a time, to a file on the
executor's local disk before starting the worker. So nothing is collected on the driver,
no Parquet copy of the DataFrame is written, and memory holds one Arrow batch, not the
partition. The tasks then exchange their row counts (``BarrierTaskContext.allGather``).

The worker reads the file memory-mapped and takes one batch of rows at a time. Every
epoch re-reads the same file, in a fresh order. Every worker runs the same number of steps,
set by the largest partition: a smaller partition makes smaller batches, never fewer
of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from corral.data.base import Batch, Shard, Source
from corral.data.sharding import epoch_permutation
from corral.errors import DataError

#: Environment variables the Spark engine sets for a worker: its spill file, and the row
#: counts of all workers' partitions, comma-separated, in rank order.
SPILL_ENV, ROWS_ENV = "CORRAL_SPILL", "CORRAL_PARTITION_ROWS"


class SpillSource(Source):
    """This worker's partition, from the spill file named in ``CORRAL_SPILL``.

    Built on the driver (it holds only column names), opened in the worker.
    """

    def __init__(self, features: Sequence[str], label: str) -> None:
        self.features, self.label = list(features), label
        self._table: Any = None
        self._rows: list[int] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"features": self.features, "label": self.label, "_table": None, "_rows": []}

    def _open(self) -> None:
        if self._table is not None:
            return
        import pyarrow as pa

        try:
            path, rows = os.environ[SPILL_ENV], os.environ[ROWS_ENV]
        except KeyError as exc:
            raise DataError(
                "a Spark DataFrame is read inside Spark tasks only: train it with engine='spark'"
            ) from exc
        self._table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        self._rows = [int(n) for n in rows.split(",")]

    @property
    def num_samples(self) -> int:
        self._open()
        return sum(self._rows)

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        """Steps for the largest partition, whatever `world_size`: each worker reads its own
        file, so after a lost worker the others go on with theirs (its rows go untrained)."""
        self._open()
        if min(self._rows) == 0:
            raise DataError(
                f"a worker's partition is empty (rows per partition: {self._rows}); "
                "the DataFrame has fewer rows than workers"
            )
        return math.ceil(max(self._rows) / batch_size)

    def _shard(self, *, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> Shard:
        self._open()
        n = self._table.num_rows
        order = epoch_permutation(n, seed + 7919 * rank, epoch, shuffle=shuffle)
        return Shard(order=order, take=self._take)

    def _take(self, idx: np.ndarray) -> Batch:
        rows = self._table.take(idx)
        x = np.column_stack(
            [rows.column(f).to_numpy(zero_copy_only=False) for f in self.features]
        ).astype(np.float32)
        y = rows.column(self.label).to_numpy(zero_copy_only=False)
        y = y.astype(np.int64) if y.dtype.kind in "iu" else y.astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)
