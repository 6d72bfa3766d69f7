"""The consistency models as pure decisions: clocks, versions, staleness, grouping."""

from __future__ import annotations

import random

import numpy as np
import pytest

from corral.ps.consistency import Consistency
from corral.ps.layout import Layout


def g(value: float) -> np.ndarray:
    return np.full(2, value, dtype=np.float32)


def test_sync_applies_the_mean_once_every_worker_pushed():
    c = Consistency(mode="sync", workers=3)
    assert c.push(0, g(1), 0) == [] and not c.may_reply(0, 1)
    assert c.push(1, g(2), 0) == []
    (update,) = c.push(2, g(6), 0)
    assert np.allclose(update.gradient, 3.0) and update.lr_scale == 1.0
    assert c.version == 1 and all(c.may_reply(w, 1) for w in range(3))


def test_sync_stops_waiting_for_a_worker_that_left():
    c = Consistency(mode="sync", workers=2)
    c.push(0, g(4), 0)
    (update,) = c.leave(1)
    assert np.allclose(update.gradient, 4.0) and c.may_reply(0, 1)


def test_async_applies_each_gradient_and_scales_by_staleness():
    c = Consistency(mode="async", workers=2, lr_scaling="staleness")
    assert c.push(0, g(1), 0)[0].lr_scale == 1.0  # fresh
    assert c.push(1, g(1), 0)[0].lr_scale == 1.0  # staleness 1: 1/max(1, 1)
    assert c.push(1, g(1), 0)[0].lr_scale == 0.5  # computed on version 0, now at 2
    assert c.histogram == {0: 1, 1: 1, 2: 1} and c.may_reply(0, 99)


def test_async_without_scaling_keeps_the_full_rate():
    c = Consistency(mode="async", workers=2)
    c.push(0, g(1), 0)
    assert c.push(1, g(1), 0)[0].lr_scale == 1.0


def test_softsync_averages_every_quorum_gradients():
    c = Consistency(mode="softsync", workers=4, quorum=2, lr_scaling="staleness")
    assert c.push(0, g(1), 0) == []
    (update,) = c.push(3, g(3), 0)
    assert np.allclose(update.gradient, 2.0) and c.version == 1
    c.push(1, g(0), 0)
    (late,) = c.push(2, g(0), 1)  # stalenesses 1 and 0: mean 0.5, scale 1/max(0.5, 1)
    assert late.lr_scale == 1.0 and c.version == 2


def test_ssp_weights_each_gradient_one_over_n():
    c = Consistency(mode="ssp", workers=4, staleness=2)
    assert c.push(0, g(1), 0)[0].lr_scale == 0.25


def simulate_ssp(workers: int, staleness: int, pushes: int, seed: int) -> list[tuple[int, list]]:
    """Random arrival order; a worker only pushes again once it was allowed to go on."""
    rng = random.Random(seed)
    c = Consistency(mode="ssp", workers=workers, staleness=staleness)
    waiting: set[int] = set()
    trace = []
    done = dict.fromkeys(range(workers), 0)
    while any(d < pushes for d in done.values()):
        ready = [w for w in range(workers) if w not in waiting and done[w] < pushes]
        if ready:
            w = rng.choice(ready)
            c.push(w, g(1), c.version)
            done[w] += 1
            waiting.add(w)
        for w in sorted(waiting):
            if c.may_reply(w, c.clocks[w]):
                waiting.discard(w)
                trace.append((w, dict(c.clocks)))
    return trace


@pytest.mark.parametrize("staleness", [0, 1, 3])
@pytest.mark.parametrize("seed", range(5))
def test_ssp_clock_gap_never_exceeds_the_bound_on_a_recorded_trace(staleness, seed):
    trace = simulate_ssp(workers=4, staleness=staleness, pushes=30, seed=seed)
    assert len(trace) == 4 * 30
    for worker, clocks in trace:  # released at clock c only if the slowest is at c - s
        assert clocks[worker] - min(clocks.values()) <= staleness


def test_ssp_with_zero_staleness_is_lock_step():
    trace = simulate_ssp(workers=3, staleness=0, pushes=10, seed=7)
    for worker, clocks in trace:
        assert clocks[worker] == min(clocks.values())


@pytest.mark.parametrize(("numel", "servers"), [(10, 3), (1_000_003, 2), (7, 7), (12345, 5)])
def test_layout_is_balanced_to_one_element(numel, servers):
    layout = Layout.split(numel, servers)
    sizes = layout.sizes()
    assert sum(sizes) == numel and max(sizes) - min(sizes) <= 1
    flat = np.arange(numel)
    assert np.array_equal(np.concatenate([layout.shard(flat, i) for i in range(servers)]), flat)


def test_layout_refuses_impossible_splits():
    with pytest.raises(ValueError, match="servers: must be at least 1"):
        Layout.split(10, 0)
    with pytest.raises(ValueError, match="cannot be split over 4 servers"):
        Layout.split(3, 4)


def test_a_joining_worker_starts_at_the_slowest_clock_so_nobody_waits_for_it():
    c = Consistency(mode="ssp", workers=3, staleness=1)
    for _ in range(5):
        c.push(0, g(1), c.version)
    for _ in range(4):
        c.push(2, g(1), c.version)
    c.leave(1)  # lost
    c.push(3, g(1), c.version)  # its successor's first push joins it at clock 4, then 5
    assert c.clocks == {0: 5, 2: 4, 3: 5} and c.live == {0, 2, 3}
    assert c.may_reply(0, 5) and c.may_reply(3, 5)
