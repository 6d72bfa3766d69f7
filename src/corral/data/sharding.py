"""Which samples each rank sees in an epoch, and how they are cut into batches.

Pure index arithmetic, no I/O, so that every source (arrays, Parquet, datasets) shares one
answer to two rules that synchronous training cannot bend:

1. **Every rank runs the same number of steps per epoch.** A collective all-reduce waits for
   every rank; a rank with one step more than the others would wait forever.
2. **Every sample is seen exactly once per epoch across ranks** — nothing dropped, nothing
   repeated — so that an epoch means the same thing on 1 worker and on 64.

Both hold at once because a rank's samples are cut into a fixed number of *near-equal*
batches (``np.array_split``) rather than into batches of a fixed size: a rank holding one
sample fewer than its neighbour simply has slightly smaller batches. ``batch_size`` is
therefore the *largest* batch a worker ever gets.

Example:
    >>> n, world_size, batch_size = 10, 3, 2
    >>> steps = steps_per_epoch(n, world_size, batch_size)
    >>> order = epoch_permutation(n, seed=0, epoch=0, shuffle=False)
    >>> lo, hi = rank_range(n, rank=2, world_size=world_size)
    >>> [b.tolist() for b in split_batches(order[lo:hi], steps)]
    [[7, 8], [9]]
"""

from __future__ import annotations

import math

import numpy as np

from corral.errors import DataError


def epoch_permutation(n: int, seed: int, epoch: int, *, shuffle: bool = True) -> np.ndarray:
    """Return the order in which the ``n`` samples (or blocks) are visited in ``epoch``.

    The generator is seeded with ``(seed, epoch)`` so that every rank computes the same
    permutation without talking to the others, each epoch differs from the last, and a run
    restarted from a checkpoint replays exactly the same order.

    Args:
        n: Number of items to order.
        seed: The job's data seed (a non-negative integer).
        epoch: The epoch number, from 0.
        shuffle: If ``False``, return the identity ``0, 1, …, n-1``.

    Returns:
        An ``int64`` array holding each of ``0 … n-1`` once.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng((seed, epoch)).permutation(n).astype(np.int64, copy=False)


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return the half-open range ``[lo, hi)`` of positions that ``rank`` owns.

    The split is contiguous and near-equal, as ``np.array_split``: the first ``n % world_size``
    ranks get one item more. Contiguity is what lets a Parquet rank read only the row groups
    that overlap its range.

    Raises:
        ValueError: If ``rank`` is not in ``[0, world_size)``.
        DataError: If there are fewer items than ranks (some rank would get nothing).
    """
    _check_split(n, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def rank_indices(
    n: int, rank: int, world_size: int, *, seed: int, epoch: int, shuffle: bool = True
) -> np.ndarray:
    """Return the sample indices ``rank`` visits in ``epoch``, in order.

    Every rank slices the same global permutation, so the ranks' parts are disjoint and
    together hold every sample exactly once.
    """
    lo, hi = rank_range(n, rank, world_size)
    return epoch_permutation(n, seed, epoch, shuffle=shuffle)[lo:hi]


def steps_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """Return how many steps every rank runs per epoch: ``ceil(largest rank share / batch_size)``.

    Raises:
        ValueError: If ``world_size`` or ``batch_size`` is below 1.
        DataError: If there are fewer samples than ranks, or if ``batch_size`` is 1 and the
            samples do not divide evenly (a rank would need an empty batch to keep pace, and
            the mean loss of an empty batch is NaN).
    """
    _check_split(n, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if batch_size == 1 and n % world_size:
        raise DataError(
            f"batch_size=1 cannot give all {world_size} workers the same number of steps over "
            f"{n} samples; use batch_size >= 2 or a sample count divisible by {world_size}"
        )
    return math.ceil(math.ceil(n / world_size) / batch_size)


def split_batches(indices: np.ndarray, steps: int) -> list[np.ndarray]:
    """Cut one rank's ``indices`` into exactly ``steps`` near-equal batches, in order.

    Raises:
        ValueError: If ``steps`` is below 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return np.array_split(indices, steps)


def block_slices(sizes: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Find the blocks that cover ``[lo, hi)`` when blocks of ``sizes`` are laid end to end.

    A Parquet rank uses this to learn which row groups (in the epoch's group order) it must
    read, and which rows of the first and last of them belong to a neighbouring rank.

    Args:
        sizes: Length of each block, in the order they are laid out.
        lo: First position wanted.
        hi: One past the last position wanted.

    Returns:
        ``(block, start, stop)`` for each overlapping block, in order: ``block`` indexes
        ``sizes``; ``start:stop`` is the wanted, non-empty slice of that block.
    """
    if hi <= lo:
        return []
    ends = np.cumsum(sizes)
    starts = ends - sizes
    first = int(np.searchsorted(ends, lo, side="right"))
    last = int(np.searchsorted(starts, hi, side="left"))
    return [
        (k, max(lo, int(starts[k])) - int(starts[k]), min(hi, int(ends[k])) - int(starts[k]))
        for k in range(first, last)
        if sizes[k] > 0
    ]


def _check_split(n: int, world_size: int) -> None:
    """Refuse splits that would leave some rank without a single sample."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if n < world_size:
        raise DataError(f"{n} samples cannot be split across {world_size} workers")
