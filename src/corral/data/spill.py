"""A Spark partition as training data: an Arrow IPC file its barrier task spilled locally.

On the Spark engine, each worker's task receives its partition of the DataFrame as Arrow
record batches (``mapInArrow``) and writes them, one batch at a time, to a file on the
executor's local disk while the worker starts, in blocks of at most the engine's
``buffer_mb``. So nothing is collected on the driver, no Parquet copy of the DataFrame is
written, and memory holds one Arrow batch, not the partition. The tasks then exchange
their row counts (``BarrierTaskContext.allGather``).

The worker reads and decodes one block at a time, so its memory, too, is bounded by the
buffer, not by the partition's size. Every epoch re-reads the same file in a fresh
order: blocks shuffled, and rows within each block, as a shuffle buffer does. Every
worker runs the same number of steps, set by the largest partition: a smaller partition
makes smaller batches, never fewer of them.

The file's layout and the variables that name it are the Spark engine's (it writes the
file), so this layer depends on the engine's contract, never the engine on training data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from corral.data.arrow import feature_matrix, label_vector
from corral.data.base import Batch, Shard, Source
from corral.data.sharding import epoch_permutation
from corral.engines.spark import BLOCKS_SUFFIX, ROWS_FROM_ENV, SPILL_ENV
from corral.errors import DataError


class SpillSource(Source):
    """This worker's partition, from the spill file named in ``CORRAL_SPILL``.

    Built on the driver (it holds only column names), opened in the worker.
    """

    partitioned = True

    def __init__(self, features: Sequence[str], label: str) -> None:
        self.features, self.label = list(features), label
        self._reader: Any = None
        self._rows: list[int] = []
        self._starts = np.zeros(1, np.int64)
        self._cached: tuple[int, Any, Any] = (-1, None, None)

    def __getstate__(self) -> dict[str, Any]:
        return {"features": self.features, "label": self.label}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["features"], state["label"])  # type: ignore[misc]

    def _open(self) -> None:
        """Open the file, reading only its footer: a block is read when a batch needs it,
        into memory freed when the next block replaces it (not memory-mapped, whose
        pages would stay resident, and count, until the kernel needs them back)."""
        if self._reader is not None:
            return
        import pyarrow as pa

        try:
            path, rows_from = os.environ[SPILL_ENV], os.environ[ROWS_FROM_ENV]
        except KeyError as exc:
            raise DataError(
                "a Spark DataFrame is read inside Spark tasks only: train it with engine='spark'"
            ) from exc
        with open(rows_from) as fifo:  # blocks until the task has spilled the partition
            rows = fifo.read()
        self._reader = pa.ipc.open_file(pa.OSFile(path, "rb"))
        self._rows = [int(n) for n in rows.split(",")]
        with open(path + BLOCKS_SUFFIX) as blocks:
            sizes = [int(n) for n in blocks.read().split(",") if n]
        self._starts = np.cumsum([0, *sizes])

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
        """Blocks (the spilled Arrow batches) in a fresh order, rows shuffled within each:
        a batch then mostly falls in one block, decoded once, instead of gathering rows
        from all over the file (measured: the all-over gather took most of an epoch)."""
        self._open()
        starts = self._starts
        rng_seed = seed + 7919 * rank
        blocks = epoch_permutation(len(starts) - 1, rng_seed, epoch, shuffle=shuffle)
        order = np.concatenate(
            [
                starts[b]
                + epoch_permutation(starts[b + 1] - starts[b], rng_seed + b, epoch, shuffle=shuffle)
                for b in blocks
            ]
            or [np.empty(0, np.int64)]
        )
        return Shard(order=order, take=self._take)

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block `b` as a float32 feature matrix and a label vector (the last one kept)."""
        if self._cached[0] != b:
            self._cached = (-1, None, None)  # let the old block go before reading the next
            rows = self._reader.get_batch(b)
            x = feature_matrix(rows, self.features)
            self._cached = (b, x, label_vector(rows, self.label))
        return self._cached[1], self._cached[2]

    def _take(self, idx: np.ndarray) -> Batch:
        owner = np.searchsorted(self._starts, idx, side="right") - 1
        xs, ys = [], []
        for b in dict.fromkeys(owner.tolist()):  # blocks in order of first use
            x, y = self._block(b)
            local = idx[owner == b] - self._starts[b]
            xs.append(x[local])
            ys.append(y[local])
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
