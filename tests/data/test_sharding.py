"""The split rules: same step count on every rank, every sample exactly once per epoch."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from corral.data import sharding
from corral.errors import DataError

COMBOS = [
    (n, w, b)
    for n, w, b in itertools.product(range(1, 41), range(1, 7), (1, 2, 3, 5, 8, 64))
    if n >= w and not (b == 1 and n % w)
]


def epoch_batches(n: int, w: int, b: int, *, seed: int = 0, epoch: int = 0) -> list[list]:
    steps = sharding.steps_per_epoch(n, w, b)
    return [
        sharding.split_batches(sharding.rank_indices(n, r, w, seed=seed, epoch=epoch), steps)
        for r in range(w)
    ]


def test_every_rank_same_steps_and_every_sample_once() -> None:
    for n, w, b in COMBOS:
        ranks = epoch_batches(n, w, b)
        steps = sharding.steps_per_epoch(n, w, b)
        assert steps == math.ceil(math.ceil(n / w) / b)
        assert all(len(batches) == steps for batches in ranks), (n, w, b)
        sizes = [len(batch) for batches in ranks for batch in batches]
        assert min(sizes) >= 1 and max(sizes) <= b, (n, w, b)
        seen = np.concatenate([np.concatenate(batches) for batches in ranks])
        np.testing.assert_array_equal(np.sort(seen), np.arange(n), err_msg=str((n, w, b)))


def test_rank_range_matches_array_split() -> None:
    for n, w in itertools.product(range(1, 30), range(1, 8)):
        if n < w:
            continue
        expected = np.array_split(np.arange(n), w)
        for r in range(w):
            lo, hi = sharding.rank_range(n, r, w)
            np.testing.assert_array_equal(np.arange(lo, hi), expected[r])


def test_epoch_permutation_seeded_per_epoch() -> None:
    p0 = sharding.epoch_permutation(50, seed=7, epoch=0)
    np.testing.assert_array_equal(np.sort(p0), np.arange(50))
    np.testing.assert_array_equal(p0, sharding.epoch_permutation(50, seed=7, epoch=0))
    assert not np.array_equal(p0, sharding.epoch_permutation(50, seed=7, epoch=1))
    assert not np.array_equal(p0, sharding.epoch_permutation(50, seed=8, epoch=0))
    identity = sharding.epoch_permutation(50, seed=7, epoch=3, shuffle=False)
    np.testing.assert_array_equal(identity, np.arange(50))


def test_epochs_reshuffle_across_ranks() -> None:
    e0, e1 = epoch_batches(40, 4, 3, epoch=0), epoch_batches(40, 4, 3, epoch=1)
    assert not np.array_equal(np.concatenate(e0[0]), np.concatenate(e1[0]))
    np.testing.assert_array_equal(np.concatenate(e0[2]), np.concatenate(epoch_batches(40, 4, 3)[2]))


def test_more_workers_than_samples_is_refused() -> None:
    with pytest.raises(DataError, match=r"^3 samples cannot be split across 4 workers$"):
        sharding.steps_per_epoch(3, 4, 8)
    with pytest.raises(DataError, match="3 samples cannot be split across 4 workers"):
        sharding.rank_range(3, 0, 4)


def test_batch_size_one_needs_an_even_split() -> None:
    assert sharding.steps_per_epoch(12, 4, 1) == 3
    with pytest.raises(DataError, match="batch_size=1 cannot give all 4 workers"):
        sharding.steps_per_epoch(10, 4, 1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sharding.rank_range(10, 2, 2), r"rank must be in \[0, 2\)"),
        (lambda: sharding.rank_range(10, -1, 2), r"rank must be in \[0, 2\)"),
        (lambda: sharding.steps_per_epoch(10, 0, 2), "world_size must be at least 1"),
        (lambda: sharding.steps_per_epoch(10, 2, 0), "batch_size must be at least 1"),
        (lambda: sharding.split_batches(np.arange(3), 0), "steps must be at least 1"),
    ],
)
def test_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_split_batches_exact_count_near_equal() -> None:
    batches = sharding.split_batches(np.arange(10), 4)
    assert [len(b) for b in batches] == [3, 3, 2, 2]


def test_block_slices_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 6, size=rng.integers(1, 8))
        total = int(sizes.sum())
        lo = int(rng.integers(0, total + 1))
        hi = int(rng.integers(lo, total + 1))
        owner = np.repeat(np.arange(len(sizes)), sizes)  # block of each position
        offset = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        expected = [
            (k, int(offset[lo:hi][owner[lo:hi] == k].min()),
             int(offset[lo:hi][owner[lo:hi] == k].max()) + 1)
            for k in np.unique(owner[lo:hi])
        ]  # fmt: skip
        assert sharding.block_slices(sizes, lo, hi) == expected
