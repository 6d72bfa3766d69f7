"""The job service's scheduling policy: pure functions of state, so no processes here."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from corral.runtime.resources import Resources, total_demand
from corral.service.resources import Quota
from corral.service.scheduler import (
    ClusterState,
    Launch,
    Policy,
    Preempt,
    QueuedJob,
    RunningJob,
    Wait,
    check_admissible,
    explain,
    queue_order,
    schedule,
)

GIB = 1024
NOW = 1000.0
#: Neither aging nor the wait limit, so that only what a test is about decides the order.
PLAIN = Policy(aging_seconds=None, max_wait_seconds=None)


def res(cpus: float = 0, gib: float = 0, gpus: int = 0) -> Resources:
    return Resources(cpus=cpus, memory_mib=int(gib * GIB), gpus=gpus)


def queued(
    id: str,
    team: str = "a",
    *,
    demand: Resources | None = None,
    priority: int = 0,
    at: float = 0.0,
    runtime: float | None = None,
) -> QueuedJob:
    return QueuedJob(
        id=id,
        team=team,
        user="u",
        demand=demand or res(cpus=1),
        priority=priority,
        submitted=at,
        expected_runtime=runtime,
    )


def running(
    id: str,
    team: str = "a",
    *,
    demand: Resources,
    priority: int = 0,
    started: float = 0.0,
    end: float | None = None,
    preemptible: bool = False,
) -> RunningJob:
    return RunningJob(
        id=id,
        team=team,
        demand=demand,
        priority=priority,
        started=started,
        expected_end=end,
        preemptible=preemptible,
    )


def launches(decisions: list) -> list[str]:
    return [d.job_id for d in decisions if isinstance(d, Launch)]


def reasons(state: ClusterState, policy: Policy = PLAIN) -> dict[str, str]:
    return {d.job_id: d.reason for d in explain(state, NOW, policy) if isinstance(d, Wait)}


# --- resources ---------------------------------------------------------------------------


def test_resources_arithmetic_and_fit() -> None:
    a, b = res(cpus=2, gib=4, gpus=1), res(cpus=1.5, gib=1)
    assert a + b == res(cpus=3.5, gib=5, gpus=1)
    assert a - b == res(cpus=0.5, gib=3, gpus=1)
    assert 3 * b == b * 3 == res(cpus=4.5, gib=3)
    assert b.fits_in(a) and not a.fits_in(b)
    assert res(cpus=0.1 + 0.2).fits_in(res(cpus=0.3))  # fractions must not drift out
    assert (b - a).clamped() == res()
    assert res(cpus=3, gib=2).dominant_share(res(cpus=9, gib=18)) == pytest.approx(1 / 3)
    assert res(gpus=1).dominant_share(res(cpus=4)) == 0.0  # the pool has no GPUs to share


def test_total_demand_sums_roles() -> None:
    workers, server = (4, res(cpus=2, gib=4, gpus=1)), (1, res(cpus=1, gib=8))
    assert total_demand([workers, server]) == res(cpus=9, gib=24, gpus=4)


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"Quota\.gpus"):
        Quota(gpus=-1)
    with pytest.raises(ValueError, match=r"Policy\.aging_seconds"):
        Policy(aging_seconds=0)


# --- gang admission and quotas -----------------------------------------------------------


def test_gang_job_waits_until_all_its_processes_fit() -> None:
    job = queued("gang", demand=total_demand([(4, res(cpus=1, gpus=1))]))
    busy = running("r", "b", demand=res(gpus=1))
    state = ClusterState(pool=res(cpus=8, gpus=4), running=[busy], queued=[job])
    assert schedule(state, NOW, PLAIN) == []  # 3 of 4 GPUs free: nothing starts, no part
    assert reasons(state)["gang"].startswith("waiting: pool has 3 of 4 GPUs free, the job needs 4")
    idle = ClusterState(pool=res(cpus=8, gpus=4), queued=[job])
    assert schedule(idle, NOW, PLAIN) == [Launch("gang")]


def test_jobs_launched_in_a_pass_count_against_later_ones() -> None:
    jobs = [queued(f"j{i}", demand=res(cpus=2), at=i) for i in range(3)]
    state = ClusterState(pool=res(cpus=5), queued=jobs)
    assert launches(schedule(state, NOW, PLAIN)) == ["j0", "j1"]


def test_team_quota_caps_a_team_but_not_others() -> None:
    state = ClusterState(
        pool=res(cpus=64, gpus=16),
        quotas={"vision": Quota(gpus=4)},
        running=[running("r", "vision", demand=res(cpus=1, gpus=3))],
        queued=[
            queued("v2", "vision", demand=res(cpus=1, gpus=2)),
            queued("big-cpu", "vision", demand=res(cpus=40), at=1),  # CPUs are uncapped
            queued("n2", "nlp", demand=res(cpus=1, gpus=2)),
        ],
    )
    assert sorted(launches(schedule(state, NOW, PLAIN))) == ["big-cpu", "n2"]
    assert reasons(state)["v2"] == (
        "waiting: team 'vision' quota for GPUs (3 of 4 used, the job needs 2)"
    )


def test_quota_holder_is_not_delayed_by_its_own_team() -> None:
    state = ClusterState(
        pool=res(cpus=64, gpus=16),
        quotas={"vision": Quota(gpus=4)},
        running=[running("r", "vision", demand=res(gpus=2))],
        queued=[
            queued("needs3", "vision", demand=res(cpus=1, gpus=3), at=0),
            queued("needs1", "vision", demand=res(cpus=1, gpus=1), at=1),
            queued("cpu-only", "vision", demand=res(cpus=4), at=2),
        ],
    )
    assert launches(schedule(state, NOW, PLAIN)) == ["cpu-only"]
    assert reasons(state)["needs1"] == "waiting: behind job needs3 in team 'vision'"
    strict = Policy(aging_seconds=None, max_wait_seconds=None, backfill=False)
    assert schedule(state, NOW, strict) == []  # without backfill, strictly in turn


def test_the_heads_team_quota_is_kept_for_it() -> None:
    # The head lacks GPUs in the pool; a job of its team taking CPUs of the team's quota
    # would stop it starting when the GPUs come free.
    state = ClusterState(
        pool=res(cpus=100, gpus=4),
        quotas={"vision": Quota(cpus=8)},
        running=[
            running("r1", "vision", demand=res(cpus=2)),
            running("r2", "o", demand=res(gpus=2)),
        ],
        queued=[
            queued("head", "vision", demand=res(cpus=4, gpus=4), at=0),
            queued("cpus4", "vision", demand=res(cpus=4), at=1),
            queued("cpus2", "vision", demand=res(cpus=2), at=2),
            queued("cpus2-more", "vision", demand=res(cpus=2), at=3),  # 2 spare CPUs taken
        ],
    )
    assert launches(schedule(state, NOW, PLAIN)) == ["cpus2"]
    assert reasons(state)["cpus4"] == "waiting: behind job head in team 'vision'"


@pytest.mark.parametrize("v3_cpus,starts", [(2, False), (1, True)])
def test_a_team_keeps_quota_for_its_quota_holder_and_the_head(v3_cpus: int, starts: bool) -> None:
    state = ClusterState(
        pool=res(cpus=100, gpus=8),
        quotas={"vision": Quota(cpus=6, gpus=2)},
        running=[
            running("r1", "vision", demand=res(gpus=2)),
            running("r2", "other", demand=res(cpus=98), end=NOW + 100),
        ],
        queued=[
            queued("v1", "vision", demand=res(cpus=1, gpus=1), at=0),  # over the GPU quota
            queued("v2", "vision", demand=res(cpus=4), at=1),  # the head: 2 CPUs free
            queued("v3", "vision", demand=res(cpus=v3_cpus), at=2, runtime=10_000),
        ],
    )
    assert launches(schedule(state, NOW, PLAIN)) == (["v3"] if starts else [])


# --- DRF between teams -------------------------------------------------------------------


@pytest.mark.parametrize("cpu_team,mem_team", [("A", "B"), ("B", "A")])
def test_drf_reproduces_the_papers_example(cpu_team: str, mem_team: str) -> None:
    # Ghodsi et al. 2011, section 4: 9 CPUs and 18 GB; one user's tasks need <1 CPU, 4 GB>,
    # the other's <3 CPUs, 1 GB>. DRF gives the first 3 tasks and the second 2, equalising
    # their dominant shares at 2/3 (memory for one, CPUs for the other).
    pool = res(cpus=9, gib=18)
    jobs = [queued(f"{mem_team}{i}", mem_team, demand=res(1, 4), at=i) for i in range(10)]
    jobs += [queued(f"{cpu_team}{i}", cpu_team, demand=res(3, 1), at=i) for i in range(10)]
    started = launches(schedule(ClusterState(pool=pool, queued=jobs), NOW, PLAIN))
    assert Counter(job_id[0] for job_id in started) == {mem_team: 3, cpu_team: 2}


def test_drf_counts_running_jobs() -> None:
    state = ClusterState(
        pool=res(cpus=10),
        running=[running("r", "busy", demand=res(cpus=6))],
        queued=[queued("b1", "busy", at=0), queued("i1", "idle", at=5), queued("i2", "idle", at=6)],
    )
    assert queue_order(state, NOW, PLAIN) == ["i1", "i2", "b1"]


# --- order within a team -----------------------------------------------------------------


def test_priority_first_then_fifo_then_id() -> None:
    jobs = [
        queued("late-high", priority=5, at=30),
        queued("early-low", priority=1, at=10),
        queued("b-tie", priority=1, at=20),
        queued("a-tie", priority=1, at=20),
    ]
    state = ClusterState(pool=res(cpus=1), queued=jobs)
    assert queue_order(state, NOW, PLAIN) == ["late-high", "early-low", "a-tie", "b-tie"]
    assert launches(schedule(state, NOW, PLAIN)) == ["late-high"]


def test_queue_order_is_stable_and_explains_every_wait() -> None:
    jobs = [queued(f"t{t}-{i}", f"t{t}", priority=i % 3, at=i) for t in range(5) for i in range(8)]
    state = ClusterState(pool=res(cpus=4), queued=jobs)
    order = queue_order(state, NOW, PLAIN)
    for seed in range(3):
        shuffled = jobs[:]
        random.Random(seed).shuffle(shuffled)
        assert queue_order(ClusterState(pool=res(cpus=4), queued=shuffled), NOW, PLAIN) == order
    decisions = explain(state, NOW, PLAIN)
    assert [d.job_id for d in decisions] == order
    assert launches(decisions) == launches(schedule(state, NOW, PLAIN)) == order[:4]
    waits = [d for d in decisions if isinstance(d, Wait)]
    assert len(waits) == len(jobs) - 4
    assert waits[0].reason == ("waiting: pool has 0 of 4 CPUs free, the job needs 1; next in line")
    assert all(w.reason.startswith("waiting: ") for w in waits)


# --- backfill ----------------------------------------------------------------------------


def backfill_state(candidate: QueuedJob, end: float | None = NOW + 100) -> ClusterState:
    """The head needs all 4 GPUs; a running job holds 2 until `end`; `candidate` is behind."""
    return ClusterState(
        pool=res(cpus=16, gpus=4),
        running=[running("r", "b", demand=res(cpus=1, gpus=2), end=end)],
        queued=[queued("head", demand=res(cpus=1, gpus=4), at=0), candidate],
    )


def test_backfill_starts_a_job_that_ends_before_the_head_can_start() -> None:
    short = queued("short", demand=res(cpus=1, gpus=1), at=1, runtime=50)
    assert launches(schedule(backfill_state(short), NOW, PLAIN)) == ["short"]


def test_backfill_refuses_a_job_that_would_delay_the_head() -> None:
    for long in (
        queued("long", demand=res(cpus=1, gpus=1), at=1, runtime=200),
        queued("long", demand=res(cpus=1, gpus=1), at=1),  # runtime unknown
    ):
        state = backfill_state(long)
        assert schedule(state, NOW, PLAIN) == []
        assert reasons(state)["long"] == "waiting: would delay job head, due to start in 100 s"


def test_backfill_uses_what_the_head_leaves_over() -> None:
    # Unknown ends: only what the head does not need may be used (CPUs here, not GPUs).
    cpu_only = queued("cpu-only", demand=res(cpus=8), at=1)
    state = backfill_state(cpu_only, end=None)
    assert launches(schedule(state, NOW, PLAIN)) == ["cpu-only"]
    greedy = queued("greedy", demand=res(cpus=16), at=1)  # would leave the head no CPU
    assert launches(schedule(backfill_state(greedy, end=None), NOW, PLAIN)) == []
    # Known ends: at T the head leaves 2 of 4 GPUs, so a long 1-GPU job fits beside it.
    state = ClusterState(
        pool=res(cpus=16, gpus=4),
        running=[running("r", "b", demand=res(gpus=3), end=NOW + 100)],
        queued=[
            queued("head", demand=res(gpus=2), at=0),
            queued("long1", demand=res(gpus=1), at=1, runtime=10_000),
        ],
    )
    assert launches(schedule(state, NOW, PLAIN)) == ["long1"]


def test_backfill_off_keeps_strict_order() -> None:
    short = queued("short", demand=res(cpus=1, gpus=1), at=1, runtime=50)
    strict = Policy(aging_seconds=None, max_wait_seconds=None, backfill=False)
    assert schedule(backfill_state(short), NOW, strict) == []


# --- aging and starvation ----------------------------------------------------------------


def test_aging_lets_an_old_low_priority_job_go_first() -> None:
    jobs = [queued("old-low", priority=0, at=0), queued("new-high", priority=2, at=NOW - 10)]
    state = ClusterState(pool=res(cpus=1), queued=jobs)
    assert launches(schedule(state, NOW, PLAIN)) == ["new-high"]
    soon = Policy(aging_seconds=NOW / 3, max_wait_seconds=None)  # old-low: 0 + 3 > 2
    assert launches(schedule(state, NOW, soon)) == ["old-low"]
    not_yet = Policy(aging_seconds=NOW / 2, max_wait_seconds=None)  # 0 + 2, FIFO wins the tie
    assert launches(schedule(state, NOW, not_yet)) == ["old-low"]
    too_slow = Policy(aging_seconds=NOW, max_wait_seconds=None)  # 0 + 1 < 2
    assert launches(schedule(state, NOW, too_slow)) == ["new-high"]


def test_overdue_job_jumps_the_drf_order_and_holds_its_reservation() -> None:
    state = ClusterState(
        pool=res(cpus=10),
        running=[running("r", "big", demand=res(cpus=6))],
        queued=[
            queued("big-job", "big", demand=res(cpus=8), at=0),
            *(queued(f"s{i}", "small", demand=res(cpus=2), at=NOW - 5) for i in range(3)),
        ],
    )
    drf_only = Policy(aging_seconds=None, max_wait_seconds=None)
    assert launches(schedule(state, NOW, drf_only)) == ["s0", "s1"]
    guard = Policy(aging_seconds=None, max_wait_seconds=NOW / 2)
    assert queue_order(state, NOW, guard)[0] == "big-job"
    assert schedule(state, NOW, guard) == []  # any small job would delay it


# --- preemption --------------------------------------------------------------------------


def preemption_state(needs: int, **victims: tuple[int, int]) -> ClusterState:
    """Team t runs preemptible jobs named by `victims` as (priority, GPUs); the pool is full."""
    run = [
        running(name, "t", demand=res(gpus=g), priority=p, started=i, preemptible=True)
        for i, (name, (p, g)) in enumerate(victims.items())
    ]
    run += [
        running("pinned", "t", demand=res(gpus=1), priority=0),  # not preemptible
        running("other", "u", demand=res(gpus=1), priority=0, preemptible=True),
    ]
    pool = res(gpus=sum(g for _, g in victims.values()) + 2)
    urgent = queued("urgent", "t", demand=res(gpus=needs), priority=5)
    return ClusterState(pool=pool, running=run, queued=[urgent])


PREEMPT = Policy(aging_seconds=None, max_wait_seconds=None, preemption=True)


def test_preemption_is_off_by_default() -> None:
    state = preemption_state(2, p1=(1, 2), p2=(2, 2))
    assert schedule(state, NOW) == []
    assert Policy().preemption is False


def test_preemption_stops_the_fewest_lowest_priority_jobs_of_the_team() -> None:
    state = preemption_state(2, p3=(3, 2), p1=(1, 2), p2=(2, 2))
    decisions = schedule(state, NOW, PREEMPT)
    assert decisions == [Preempt("p1", "preempted for job urgent of team 't' (5 > 1)")]
    state = preemption_state(4, p3=(3, 2), p1=(1, 2), p2=(2, 2))
    assert [d.job_id for d in schedule(state, NOW, PREEMPT)] == ["p1", "p2"]


def test_preemption_spares_jobs_that_turn_out_unneeded() -> None:
    state = preemption_state(4, small=(1, 1), large=(2, 5))
    assert [d.job_id for d in schedule(state, NOW, PREEMPT)] == ["large"]


def test_preemption_needs_strictly_lower_priority_and_enough_to_free() -> None:
    assert schedule(preemption_state(2, same=(5, 2)), NOW, PREEMPT) == []
    assert schedule(preemption_state(3, p1=(1, 2)), NOW, PREEMPT) == []  # 2 GPUs never do


# --- never fits --------------------------------------------------------------------------


def test_check_admissible_gives_the_numbers() -> None:
    pool = res(cpus=8, gib=32, gpus=8)
    vision = Quota(gpus=4)
    assert check_admissible(queued("j", demand=res(cpus=12)), pool, None) == (
        "the job asks for 12 CPUs in all but the pool has 8 CPUs"
    )
    assert check_admissible(queued("j", "vision", demand=res(cpus=1, gpus=6)), pool, vision) == (
        "the job asks for 6 GPUs in all but team 'vision' may use at most 4 GPUs"
    )
    assert check_admissible(queued("j", demand=res(cpus=1, gib=40)), pool, None) == (
        "the job asks for 40 GiB of memory in all but the pool has 32 GiB of memory"
    )
    assert check_admissible(queued("j", demand=res(cpus=8, gib=32, gpus=4)), pool, vision) is None


def test_a_job_that_never_fits_does_not_block_the_queue() -> None:
    state = ClusterState(
        pool=res(cpus=8),
        queued=[queued("huge", demand=res(cpus=12), priority=9), queued("small", at=1)],
    )
    assert launches(schedule(state, NOW, PLAIN)) == ["small"]
    assert reasons(state)["huge"] == (
        "never fits: the job asks for 12 CPUs in all but the pool has 8 CPUs"
    )


# --- scale -------------------------------------------------------------------------------


def test_ten_thousand_jobs_of_a_hundred_teams_share_the_pool_evenly() -> None:
    jobs = [
        queued(f"t{t:02d}-{i:03d}", f"t{t:02d}", priority=i % 4, at=i)
        for t in range(100)
        for i in range(100)
    ]
    state = ClusterState(pool=res(cpus=250), queued=jobs)
    started = launches(schedule(state, NOW, PLAIN))
    assert len(started) == len(set(started)) == 250
    per_team = Counter(job_id[:3] for job_id in started)
    assert sorted(Counter(per_team.values()).items()) == [(2, 50), (3, 50)]
    # each team started its highest-priority jobs: priority 3 (i % 4 == 3) first
    assert all(int(job_id[4:]) % 4 == 3 for job_id in started)
    assert len(queue_order(state, NOW, PLAIN)) == 10_000


@pytest.mark.parametrize("seed", range(30))
def test_early_stop_changes_no_decision_and_launches_respect_pool_and_quotas(seed: int) -> None:
    # schedule() drops teams and stops early; explain() walks every job. Same launches.
    rng = random.Random(seed)

    def demand() -> Resources:
        return res(
            cpus=rng.choice([1, 2, 4, 8]), gib=rng.choice([1, 4, 16]), gpus=rng.choice([0, 0, 1, 2])
        )

    teams = [f"t{i}" for i in range(6)]
    run = [
        running(
            f"r{i}",
            rng.choice(teams),
            demand=demand(),
            end=rng.choice([None, NOW + rng.uniform(1, 500)]),
        )
        for i in range(rng.randrange(0, 8))
    ]
    jobs = [
        queued(
            f"q{i}",
            rng.choice(teams),
            demand=demand(),
            priority=rng.randrange(3),
            at=rng.uniform(0, NOW),
            runtime=rng.choice([None, rng.uniform(1, 800)]),
        )
        for i in range(60)
    ]
    quotas = {t: Quota(gpus=rng.choice([2, 4]), cpus=rng.choice([None, 12])) for t in teams[:3]}
    pool = res(cpus=48, gib=96, gpus=8)
    state = ClusterState(pool=pool, quotas=quotas, running=run, queued=jobs)
    for policy in (PLAIN, Policy(aging_seconds=200, max_wait_seconds=900), Policy(backfill=False)):
        started = launches(schedule(state, NOW, policy))
        assert started == launches(explain(state, NOW, policy))
        by_id = {j.id: j for j in jobs}
        total = {t: Resources() for t in teams}
        for r in run:
            total[r.team] += r.demand
        for job_id in started:
            total[by_id[job_id].team] += by_id[job_id].demand
        assert sum(total.values(), Resources()).fits_in(pool)
        for team, quota in quotas.items():
            caps = dict(zip(("cpus", "memory_mib", "gpus"), quota.caps(), strict=True))
            assert total[team].fits_in(Resources(**caps)) or not any(
                by_id[j].team == team for j in started
            )
