"""The consistency models as pure decisions: clocks, versions, staleness, grouping."""

from __future__ import annotations

import random

import numpy as np
import pytest

from corral.ps.asynchronous import Asynchronous
from corral.ps.layout import Layout
from corral.ps.settings import ServerSettings, consistency_for
from corral.ps.softsync import SoftSynchronous
from corral.ps.ssp import StaleSynchronous
from corral.ps.sync import BulkSynchronous


def g(value: float) -> np.ndarray:
    return np.full(2, value, dtype=np.float32)


def test_sync_applies_the_mean_once_every_worker_pushed():
    c = BulkSynchronous(3)
    assert c.push(0, g(1), 0) == [] and not c.may_reply(0, 1)
    assert c.push(1, g(2), 0) == []
    (update,) = c.push(2, g(6), 0)
    assert np.allclose(update.gradient, 3.0) and update.lr_scale == 1.0
    assert c.version == 1 and all(c.may_reply(w, 1) for w in range(3))


def test_sync_stops_waiting_for_a_worker_that_left():
    c = BulkSynchronous(2)
    c.push(0, g(4), 0)
    (update,) = c.leave(1)
    assert np.allclose(update.gradient, 4.0) and c.may_reply(0, 1)


def test_async_applies_each_gradient_and_scales_by_staleness():
    c = Asynchronous(2, lr_scaling="staleness")
    assert c.push(0, g(1), 0)[0].lr_scale == 1.0  # fresh
    assert c.push(1, g(1), 0)[0].lr_scale == 1.0  # staleness 1: 1/max(1, 1)
    assert c.push(1, g(1), 0)[0].lr_scale == 0.5  # computed on version 0, now at 2
    assert c.histogram == {0: 1, 1: 1, 2: 1} and c.may_reply(0, 99)


def test_async_without_scaling_keeps_the_full_rate():
    c = Asynchronous(2)
    c.push(0, g(1), 0)
    assert c.push(1, g(1), 0)[0].lr_scale == 1.0


def test_softsync_averages_every_quorum_gradients():
    c = SoftSynchronous(4, quorum=2, lr_scaling="staleness")
    assert c.push(0, g(1), 0) == []
    (update,) = c.push(3, g(3), 0)
    assert np.allclose(update.gradient, 2.0) and c.version == 1
    c.push(1, g(0), 0)
    (late,) = c.push(2, g(0), 1)  # stalenesses 1 and 0: mean 0.5, scale 1/max(0.5, 1)
    assert late.lr_scale == 1.0 and c.version == 2


def test_ssp_weights_each_gradient_one_over_n():
    c = StaleSynchronous(4, staleness=2)
    assert c.push(0, g(1), 0)[0].lr_scale == 0.25


def simulate_ssp(workers: int, staleness: int, pushes: int, seed: int) -> list[tuple[int, list]]:
    """Random arrival order; a worker only pushes again once it was allowed to go on."""
    rng = random.Random(seed)
    c = StaleSynchronous(workers, staleness=staleness)
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
    c = StaleSynchronous(3, staleness=1)
    for _ in range(5):
        c.push(0, g(1), c.version)
    for _ in range(4):
        c.push(2, g(1), c.version)
    c.leave(1)  # lost
    c.push(3, g(1), c.version)  # its successor's first push joins it at clock 4, then 5
    assert c.clocks == {0: 5, 2: 4, 3: 5} and c.live == {0, 2, 3}
    assert c.may_reply(0, 5) and c.may_reply(3, 5)


@pytest.mark.parametrize(
    ("settings", "model"),
    [
        (ServerSettings(), BulkSynchronous),
        (ServerSettings(mode="async", lr_scaling="staleness"), Asynchronous),
        (ServerSettings(mode="ssp", staleness=3), StaleSynchronous),
        (ServerSettings(mode="softsync", quorum=2), SoftSynchronous),
    ],
)
def test_the_settings_pick_the_model_of_their_mode(settings, model):
    rules = consistency_for(settings, workers=4)
    assert type(rules) is model and rules.live == {0, 1, 2, 3}
    assert rules.lr_scaling == settings.lr_scaling
    assert getattr(rules, "staleness", 0) == settings.staleness
    assert getattr(rules, "quorum", 1) == settings.quorum


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "ssp", "quorum": 2}, "quorum"),
        ({"mode": "async", "quorum": 2}, "quorum"),
        ({"mode": "sync", "staleness": 1}, "staleness"),
        ({"mode": "softsync", "quorum": 2, "staleness": 3}, "staleness"),
    ],
)
def test_a_setting_its_mode_ignores_is_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}\n  Value error, only mode '\w+' uses it"):
        ServerSettings(**kwargs)


def test_defaults_are_accepted_in_every_mode_even_when_written_out():
    for mode in ("sync", "async", "ssp", "softsync"):
        assert ServerSettings(mode=mode, staleness=0, quorum=1).mode == mode


def test_settings_are_frozen_and_refuse_unknown_fields():
    settings = ServerSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.mode = "async"
    with pytest.raises(ValueError, match="servers\n  Extra inputs are not permitted"):
        ServerSettings(servers=2)


def test_a_restored_model_goes_on_where_the_saved_one_was():
    saved = StaleSynchronous(3, staleness=1)
    for worker in (0, 0, 2):
        saved.push(worker, g(1), saved.version)
    saved.leave(1)
    restored = StaleSynchronous(3, staleness=1)
    restored.restore(saved.state())
    assert (restored.version, restored.clocks, restored.live) == (3, {0: 2, 2: 1}, {0, 2})
    assert restored.histogram == saved.histogram
    assert restored.may_reply(0, 2) and not restored.may_reply(0, 3)
