"""The :class:`Source` contract, and the data checks every source shares.

A source knows how many samples it has and how to fetch the rows one rank owns in one
epoch; the split itself (same step count on every rank, every sample once per epoch) is the
arithmetic of :mod:`corral.data.sharding` and is applied here, once, for all sources.
Sources are cloudpickled to the worker processes, so they hold paths and arrays, never open
files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from corral.data import sharding
from corral.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Shard:
    """One rank's part of one epoch: the rows it visits, in order, and how to fetch them.

    Attributes:
        order: Indices, in visiting order, into the row space that ``take`` understands.
        take: Fetches the rows at some of those indices as one ``(x, y)`` batch.
    """

    order: np.ndarray
    take: Callable[[np.ndarray], Batch]


class Source(ABC):
    """Training data that every rank can read its own part of, without talking to the others.

    Subclasses implement :attr:`num_samples` and :meth:`_shard`; cutting a shard into equal
    step counts of near-equal batches is done here.

    Example:
        >>> from corral.data import as_source
        >>> source = as_source((np.random.rand(10, 3), np.arange(10)))
        >>> [len(x) for x, _ in source.batches(rank=1, world_size=2, epoch=0, seed=0,
        ...                                     batch_size=2)]
        [2, 2, 1]
    """

    #: Whether each worker holds only rows of its own (a Spark partition), so that
    #: `arrays` in a worker is that worker's part, not the whole data.
    partitioned: bool = False

    @property
    @abstractmethod
    def num_samples(self) -> int:
        """Number of samples in one epoch, over all ranks."""

    @abstractmethod
    def _shard(self, *, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> Shard:
        """Return ``rank``'s rows for ``epoch``; over all ranks they cover each sample once.

        Called only after the split was validated, so ``world_size <= num_samples``.
        """

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample as one ``(x, y)`` pair of arrays, in storage order, checked as
        batches are: for libraries that take the whole data at once (scikit-learn)."""
        shard = self._shard(rank=0, world_size=1, epoch=0, seed=0, shuffle=False)
        x, y = shard.take(shard.order)
        return x.numpy(), y.numpy()

    def groups(self) -> np.ndarray | None:
        """Each sample's group id (its client, in a federated simulation), in storage
        order, read from a column that is not a feature; None for data without one."""
        return None

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        """Return the number of batches every rank yields per epoch (the same on all ranks).

        Raises:
            DataError: If there are fewer samples than workers.
        """
        return sharding.steps_per_epoch(self.num_samples, world_size, batch_size)

    def batches(
        self,
        *,
        rank: int,
        world_size: int,
        epoch: int,
        seed: int,
        batch_size: int,
        shuffle: bool = True,
    ) -> Iterator[Batch]:
        """Yield exactly :meth:`steps_per_epoch` ``(x, y)`` batches for ``rank`` in ``epoch``.

        Validation and the loading of the rank's part happen at the call, not at the first
        ``next()``, so a bad split or bad data fails where it is asked for.

        Args:
            rank: This worker's rank, in ``[0, world_size)``.
            world_size: Number of workers sharing the data.
            epoch: Epoch number; with ``shuffle`` each epoch has its own order.
            seed: Data seed (non-negative); the same seed replays the same order.
            batch_size: The largest batch a worker gets; batches are near-equal, not fixed.
            shuffle: Visit samples in a seeded random order rather than storage order.

        Raises:
            DataError: If there are fewer samples than workers, or the data read is invalid.
        """
        steps = self.steps_per_epoch(world_size, batch_size)
        sharding.rank_range(self.num_samples, rank, world_size)  # validates rank up front
        shard = self._shard(
            rank=rank, world_size=world_size, epoch=epoch, seed=seed, shuffle=shuffle
        )
        return (shard.take(idx) for idx in sharding.split_batches(shard.order, steps))


class IndexedSource(Source):
    """A source that can fetch any sample by its global index: arrays, map-style datasets.

    Each rank slices the same global permutation of the epoch, which is the finest shuffle
    there is; sources that must read in blocks (Parquet row groups) implement ``_shard``
    themselves.
    """

    @abstractmethod
    def _take(self, idx: np.ndarray) -> Batch:
        """Fetch the samples at global indices ``idx`` as one ``(x, y)`` batch."""

    def _shard(self, *, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> Shard:
        """Give ``rank`` its contiguous range of the epoch's global permutation."""
        order = sharding.rank_indices(
            self.num_samples, rank, world_size, seed=seed, epoch=epoch, shuffle=shuffle
        )
        return Shard(order, self._take)


def take_rows(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Batch:
    """Gather rows ``idx`` of ``x`` and ``y`` as tensors, without a Python loop over rows.

    Fancy indexing already copies, so ``torch.from_numpy`` can wrap the copy as is.
    """
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def check_columns(requested: Sequence[Any], available: Sequence[Any], where: str) -> None:
    """Raise a :class:`DataError` naming the missing columns and listing those ``where`` has.

    Listing what exists turns a typo into a one-glance fix; very wide tables are cut at 50.
    """
    present = set(available)
    missing = [c for c in dict.fromkeys(requested) if c not in present]
    if missing:
        shown = ", ".join(str(c) for c in available[:50])
        more = f" … and {len(available) - 50} more" if len(available) > 50 else ""
        raise DataError(f"column(s) {quoted(missing)} not found; {where} has: {shown}{more}")


def check_group_column(group: str | None, features: Sequence[Any], label: str) -> None:
    """Refuse a group id column that is also the label or a listed feature."""
    if group is None:
        return
    if group == label:
        raise DataError(f"column {group!r} cannot be both the label and the client id column")
    if group in features:
        raise DataError(
            f"column {group!r} is the client id column and cannot also be a feature; "
            "remove it from features"
        )


def check_finite(
    a: np.ndarray,
    what: str,
    columns: Sequence[Any] | None = None,
    *,
    first_row: int = 0,
    file: str | None = None,
) -> None:
    """Raise a :class:`DataError` counting NaN/inf values of ``a`` and locating the first.

    Checked before training rather than discovered as a NaN loss hours in.

    Args:
        a: Array with one row per sample; non-float arrays cannot hold NaN and pass.
        what: How the message names the array: ``"features"``, ``"label"`` or ``"label 'y'"``.
        columns: Names of ``a``'s columns (2-D arrays), so the message can say which.
        first_row: Row number of ``a[0]`` in the user's data, when ``a`` is a slice of it.
        file: The file ``a`` was read from, if any, so the message can name it.
    """
    if a.dtype.kind != "f":
        return
    bad = ~np.isfinite(a)
    count = int(bad.sum())
    if not count:
        return
    row, *rest = (int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
    where = f"row {first_row + row}"
    if len(rest) == 1:
        where += f", column {columns[rest[0]]!r}" if columns is not None else f", column {rest[0]}"
    elif rest:
        where += f", position {tuple(rest)}"
    verb = "contain" if what == "features" else "contains"
    origin = "" if file is None else f" in {file}"
    raise DataError(f"{what} {verb} {count} NaN/inf values (first at {where}){origin}")


def quoted(names: Sequence[Any]) -> str:
    """Format names as ``'a', 'b'`` for error messages."""
    return ", ".join(repr(n) for n in names)
