"""Claim: one scheduling pass over 10,000 queued jobs of 100 teams takes under 100 ms.

Builds a seeded random cluster state — ``--jobs`` queued jobs spread over ``--teams`` teams
(1–8 workers of 1–4 CPUs, 2–16 GiB and 0–2 GPUs each, a parameter server for some,
priorities 0–3, submitted over the last 20 hours, a runtime estimate for half), GPU quotas
for a third of the teams, and a pool of 512 CPUs / 2 TiB / 64 GPUs about three quarters
taken by running jobs — and times ``corral.service.scheduler.schedule()`` on it (median and
worst of ``--passes`` passes), then on the same queue with an idle pool (many launches) and
behind a reserved head that every hole would delay (nothing may start).

In the same run it times a naive peer that sorts the whole queue, then launches one job per
step by first fit, recomputing every team's dominant share from scratch at each step (DRF
without the heaps, and without a reservation, so its launches differ), and ``explain()``,
which never stops early: it looks at every job and words its reason for the cluster page,
so its time bounds what any ``schedule()`` pass on that queue can cost.

Run: ``.venv/bin/python bench/schedule_pass.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from corral.runtime.resources import Resources, total_demand
from corral.service.resources import Quota
from corral.service.scheduler import (
    ClusterState,
    Launch,
    Policy,
    QueuedJob,
    RunningJob,
    explain,
    schedule,
)

NOW = 1_000_000.0
GIB = 1024


def build(jobs: int, teams: int, seed: int) -> ClusterState:
    rng = np.random.default_rng(seed)
    names = [f"team{t:03d}" for t in range(teams)]

    def demand() -> Resources:
        each = Resources(
            cpus=int(rng.choice([1, 2, 4])),
            memory_mib=int(rng.choice([2, 4, 8, 16])) * GIB,
            gpus=int(rng.choice([0, 0, 0, 1, 2])),
        )
        roles = [(int(rng.integers(1, 9)), each)]
        if rng.random() < 0.2:
            roles.append((1, Resources(cpus=2, memory_mib=8 * GIB)))
        return total_demand(roles)

    queued = [
        QueuedJob(
            id=f"q{i}",
            team=names[int(rng.integers(teams))],
            user=f"user{int(rng.integers(500))}",
            priority=int(rng.integers(4)),
            demand=demand(),
            submitted=NOW - float(rng.uniform(0, 20 * 3600)),
            expected_runtime=float(rng.uniform(600, 36000)) if rng.random() < 0.5 else None,
        )
        for i in range(jobs)
    ]
    pool = Resources(cpus=512, memory_mib=2048 * GIB, gpus=64)
    running: list[RunningJob] = []
    used = Resources()
    for _ in range(200):  # about three quarters of the pool taken
        d = demand()
        if not (used + d).fits_in(Resources(cpus=384, memory_mib=1536 * GIB, gpus=48)):
            continue
        used = used + d
        running.append(
            RunningJob(
                id=f"r{len(running)}",
                team=names[int(rng.integers(teams))],
                priority=int(rng.integers(4)),
                demand=d,
                started=NOW - 3600,
                expected_end=NOW + float(rng.uniform(60, 7200)) if rng.random() < 0.7 else None,
                preemptible=bool(rng.random() < 0.5),
            )
        )
    quotas = {name: Quota(gpus=16) for name in names[::3]}
    return ClusterState(pool=pool, quotas=quotas, running=running, queued=queued)


def idle(state: ClusterState) -> ClusterState:
    """The same queue on an idle pool, as after a restart: many launches in one pass."""
    return replace(state, running=[])


def reserved(state: ClusterState) -> ClusterState:
    """The same queue behind a reserved head that every hole would delay.

    A day-old job (so first in order) needs all the pool the running jobs do not hold; one
    running job ends in a minute and frees exactly what the head lacks beyond the 16 CPUs
    and 128 GiB left free. Every queued job that fits those runs longer than a minute and
    does not fit the (empty) extra at the head's start, so none may start.
    """
    running = [replace(r, expected_end=None) for r in state.running]
    held = Resources()
    for r in running:
        held = held + r.demand
    left = Resources(cpus=16, memory_mib=128 * GIB)
    ending = RunningJob(
        id="ending", team="other", demand=state.pool - held - left, started=0, expected_end=NOW + 60
    )
    head = QueuedJob(id="head", team="other", demand=state.pool - held, submitted=NOW - 86400)
    return replace(state, running=[*running, ending], queued=[head, *state.queued])


def naive(state: ClusterState, now: float, policy: Policy) -> list[str]:
    """Sort everything, then one first-fit launch per step with DRF shares recomputed."""
    aging = policy.aging_seconds or float("inf")
    order = sorted(
        state.queued,
        key=lambda j: (-(j.priority + (now - j.submitted) // aging), j.submitted, j.id),
    )
    by_team: dict[str, list[QueuedJob]] = {}
    for job in order:
        by_team.setdefault(job.team, []).append(job)
    holding: list[tuple[str, Resources]] = [(r.team, r.demand) for r in state.running]
    launched: list[str] = []
    while True:
        usage: dict[str, Resources] = {}
        for team, d in holding:
            usage[team] = usage.get(team, Resources()) + d
        free = state.pool
        for d in usage.values():
            free = free - d
        pick = None
        for team in sorted(
            by_team, key=lambda t: usage.get(t, Resources()).dominant_share(state.pool)
        ):
            quota = state.quotas.get(team, Quota())
            c, m, g = quota.caps()
            cap = Resources(cpus=c, memory_mib=m, gpus=g)  # type: ignore[arg-type]
            for job in by_team[team]:
                if job.demand.fits_in(free) and (usage.get(team, Resources()) + job.demand).fits_in(
                    cap
                ):
                    pick = job
                    break
            if pick is not None:
                break
        if pick is None:
            return launched
        by_team[pick.team].remove(pick)
        holding.append((pick.team, pick.demand))
        launched.append(pick.id)


def timed(fn: Callable[[], int], passes: int) -> tuple[float, float, int]:
    times = []
    for _ in range(passes):
        gc.collect()
        start = time.perf_counter()
        launches = fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), max(times), launches


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--teams", type=int, default=100)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    typical = build(args.jobs, args.teams, args.seed)
    policy = Policy()
    print(
        f"\n{platform.node()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
        f"{args.jobs} queued jobs of {args.teams} teams, {len(typical.running)} running, "
        f"pool 512 CPUs / 2 TiB / 64 GPUs; median and worst of {args.passes} passes "
        f"({max(3, args.passes // 4)} for the others)\n"
    )
    print("| state | pass | target | median ms | worst ms | launches |")
    print("|---|---|---:|---:|---:|---:|")
    ratios = []
    states = (
        ("typical", typical),
        ("idle pool", idle(typical)),
        ("head reserved, every hole would delay it", reserved(typical)),
    )
    for label, state in states:
        ours = timed(lambda s=state: len(schedule(s, NOW, policy)), args.passes)
        peer = timed(lambda s=state: len(naive(s, NOW, policy)), max(3, args.passes // 4))
        ui = timed(
            lambda s=state: sum(isinstance(d, Launch) for d in explain(s, NOW, policy)),
            max(3, args.passes // 4),
        )
        rows = (
            ("ours: `schedule()`", "< 100 ms", ours),
            ("naive: sort all, first fit, DRF recomputed per step", "", peer),
            ("ours: `explain()`, every job with its reason", "", ui),
        )
        for name, target, (median, slowest, launches) in rows:
            print(f"| {label} | {name} | {target} | {median:.1f} | {slowest:.1f} | {launches} |")
        ratios.append(f"{label}: {peer[0] / ours[0]:.1f}×")
    print("\nnaive / ours, time per pass (medians): " + "; ".join(ratios))
    print("(the naive peer has no reservation: its launches may delay the head)")


if __name__ == "__main__":
    main()
