"""The job service's scheduling policy: cluster state in, decisions out; nothing runs here.

`schedule` walks the queue once, in one order, and decides which jobs start now
(`Launch`) and, if enabled, which running jobs give way (`Preempt`). `explain` and
`queue_order` walk the same order for the cluster page and say why each job waits.

Order. Jobs that waited ``Policy.max_wait_seconds`` come first, oldest first. The rest are
merged across teams by Dominant Resource Fairness (Ghodsi et al., "Dominant Resource
Fairness: Fair Allocation of Multiple Resource Types", NSDI 2011): the next place goes to
the team with the smallest dominant share — the largest fraction of the pool it holds in
any resource, counting its running jobs and its jobs placed earlier in the order — ties by
team name. Within a team: effective priority, higher first, where effective priority is
``priority + ⌊waited / aging_seconds⌋``; then submit time (FIFO); then id.

Walk. A job starts only if all of it fits at once (gang admission): its whole demand in the
free pool and in its team's quota left. A job that can never fit (more than the pool or its
team's quota) is passed over; `check_admissible` rejects it at submit. A job that does not
fit its team's quota holds the rest of that quota: later jobs of its team may start only in
what is left after it. It holds no pool: the pool is not kept idle for a team that may not
use it, and a team's quota never holds back another team.

Backfill, EASY style (Lifka, "The ANL/IBM SP scheduling system", JSSPP 1995). The first job
that fits its quota but not the free pool is the head, and gets a reservation: walking the
known ends of running jobs (``expected_end``; a job launched in this pass ends at ``now +
expected_runtime``), its start T is the first end at which the freed pool holds it, and the
extra is what is then left over. A later job may start now if it fits now and either ends
by T (its ``expected_runtime`` is known) or fits in the extra, which it then uses up. If T
is unknown (ends unknown, or too few), the extra is the free pool minus the head's demand,
clamped at 0 per resource: only jobs leaving all the head lacks untouched start, and they
cannot delay it at all. So the head starts by T as far as the estimates hold. As in EASY
one job holds a reservation; the same rule, without T, keeps the head's team quota.

Starvation. Aging bounds how long newer work may overtake a job within its team: a job of
priority p yields to later jobs of priority p' only until it has waited ``(p' - p) ×
aging_seconds`` longer than they have. Between teams, a team above its fair share waits while
the others catch up, as DRF intends; and a job that has waited ``max_wait_seconds`` goes
ahead of the DRF order, so it becomes the head and its reservation starts it as soon as
running jobs free enough — so no order of teams can hold a job back forever.

Preemption (off by default) stays within a team, so that one team's priorities never cost
another team anything: fairness between teams is DRF's job. A waiting job up to the head
(the head, or a team's quota holder) displaces running ``preemptible`` jobs of its own team
of strictly lower base priority (aging never preempts, so two jobs cannot take turns
preempting each other) if stopping them makes it fit pool and quota: lowest priority first,
most recently started first among equals (least work lost), then sparing any that turn out
unneeded. The runner checkpoints and requeues them; the same state gives the same picks.

Cost. A pass is O(n + k log n) for n queued jobs of which k are looked at: a heap per team,
heapified once per pass with aging frozen at ``now``, and a heap of teams keyed by dominant
share. Once the head is known, a team whose remaining jobs' floor (least demand in each
resource, shortest runtime) cannot start in what is left is dropped from the walk.

Example:
    >>> pool = Resources(cpus=8, memory_mib=32768)
    >>> job = QueuedJob(id="a", team="vision", demand=Resources(cpus=4), submitted=0)
    >>> schedule(ClusterState(pool=pool, queued=[job]), now=10)
    [Launch(job_id='a')]
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from corral.runtime.resources import DIMS, EPS, Resources
from corral.service.resources import (
    Quota,
    accumulate,
    amount,
    amounts,
    deduct,
    fits,
    label,
    number,
)

_NO_CAPS = (math.inf, math.inf, math.inf)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunningJob:
    """A job holding resources now; `expected_end` (if known) lets backfill plan around it."""

    id: str
    team: str
    demand: Resources
    started: float
    priority: int = 0
    expected_end: float | None = None
    preemptible: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class QueuedJob:
    """A job waiting to start; `expected_runtime` (if known) lets it fill holes (backfill)."""

    id: str
    team: str
    demand: Resources
    submitted: float
    user: str = ""
    priority: int = 0
    expected_runtime: float | None = None


@dataclass(frozen=True, kw_only=True)
class ClusterState:
    """Everything a pass looks at: the pool, team quotas, and running and queued jobs."""

    pool: Resources
    quotas: Mapping[str, Quota] = field(default_factory=dict)
    running: Sequence[RunningJob] = ()
    queued: Sequence[QueuedJob] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    """Knobs of the policy; ``None`` turns aging or the wait limit off."""

    aging_seconds: float | None = 3600.0
    max_wait_seconds: float | None = 86400.0
    backfill: bool = True
    preemption: bool = False

    def __post_init__(self) -> None:
        for name in ("aging_seconds", "max_wait_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Policy.{name} must be > 0 or None, not {value}")


@dataclass(frozen=True, slots=True)
class Launch:
    """Start this queued job now, all its processes at once."""

    job_id: str


@dataclass(frozen=True, slots=True)
class Preempt:
    """Checkpoint, stop and requeue this running job; `reason` names who needs its place."""

    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Wait:
    """This queued job does not start now, and `reason` says why (for the cluster page)."""

    job_id: str
    reason: str


Decision = Launch | Preempt | Wait
_DEFAULT_POLICY = Policy()


def check_admissible(job: QueuedJob, pool: Resources, quota: Quota | None = None) -> str | None:
    """Why `job` can never start, in one line with the numbers; ``None`` if it can.

    Called at submit, so that a job which would wait forever is refused at once.

    Example:
        >>> job = QueuedJob(id="a", team="nlp", demand=Resources(cpus=12), submitted=0)
        >>> check_admissible(job, Resources(cpus=8, memory_mib=1024), None)
        'the job asks for 12 CPUs in all but the pool has 8 CPUs'
    """
    asks = job.demand.as_tuple()
    caps = _NO_CAPS if quota is None else quota.caps()
    problems = []
    for limits, has in (
        (pool.as_tuple(), "the pool has"),
        (caps, f"team '{job.team}' may use at most"),
    ):
        over = [k for k in range(3) if asks[k] > limits[k] + EPS]
        if over:
            problems.append(f"{amounts(asks, over)} in all but {has} {amounts(limits, over)}")
    return "the job asks for " + "; and ".join(problems) if problems else None


def schedule(state: ClusterState, now: float, policy: Policy = _DEFAULT_POLICY) -> list[Decision]:
    """Decide which queued jobs start now and, if enabled, which running jobs to preempt.

    Example:
        >>> jobs = [QueuedJob(id=i, team="t", demand=Resources(cpus=1), submitted=0) for i in "abc"]
        >>> schedule(ClusterState(pool=Resources(cpus=2), queued=jobs), now=0)
        [Launch(job_id='a'), Launch(job_id='b')]
    """
    walk = _Pass(state, now, policy, explain=False)
    walk.run()
    decisions = walk.decisions
    if policy.preemption:
        decisions += walk.preemptions()
    return decisions


def explain(state: ClusterState, now: float, policy: Policy = _DEFAULT_POLICY) -> list[Decision]:
    """Every queued job in scheduling order: `Launch` if it starts now, else `Wait` and why."""
    walk = _Pass(state, now, policy, explain=True)
    walk.run()
    return walk.decisions


def queue_order(state: ClusterState, now: float, policy: Policy = _DEFAULT_POLICY) -> list[str]:
    """Ids of the queued jobs in the order this pass offers them places (see `explain`)."""
    return [d.job_id for d in explain(state, now, policy)]


class _Pass:
    """One walk of the queue in scheduling order; the module docstring gives the rules."""

    def __init__(self, state: ClusterState, now: float, policy: Policy, explain: bool) -> None:
        self.state, self.now, self.policy, self.explain = state, now, policy, explain
        self.pool = state.pool.as_tuple()
        self.free = list(self.pool)
        self.usage: dict[str, list[float]] = {}
        self.running_by_team: dict[str, list[RunningJob]] = {}
        for r in state.running:
            accumulate(self.usage.setdefault(r.team, [0.0, 0.0, 0.0]), r.demand)
            deduct(self.free, r.demand.as_tuple())
            self.running_by_team.setdefault(r.team, []).append(r)
        self.caps = {team: q.caps() for team, q in state.quotas.items()}
        self.decisions: list[Decision] = []
        self.launched: list[QueuedJob] = []
        self.blocked: list[QueuedJob] = []  # preemption candidates, up to the head
        self.head: QueuedJob | None = None
        self.head_start: float | None = None
        self.extra = [0.0, 0.0, 0.0]
        self.team_head: dict[str, QueuedJob] = {}
        self.team_extra: dict[str, list[float]] = {}
        self.heaps: dict[str, list[tuple[float, float, str, int, QueuedJob]]] = {}
        self.floors: dict[str, tuple[float, float, float, float]] = {}

    def order(self) -> Iterator[QueuedJob]:
        """Yield queued jobs lazily in scheduling order: overdue first, then by DRF."""
        now, aging, max_wait = self.now, self.policy.aging_seconds, self.policy.max_wait_seconds
        heaps = self.heaps
        overdue = []
        for i, j in enumerate(self.state.queued):
            waited = now - j.submitted
            if max_wait is not None and waited >= max_wait:
                overdue.append((j.submitted, j.id, i, j))
                continue
            bonus = waited // aging if aging is not None and waited > 0 else 0
            heaps.setdefault(j.team, []).append((-(j.priority + bonus), j.submitted, j.id, i, j))
        placed = {t: list(u) for t, u in self.usage.items()}
        for *_, j in sorted(overdue):
            accumulate(placed.setdefault(j.team, [0.0, 0.0, 0.0]), j.demand)
            yield j
        inv = [1 / p if p > 0 else 0.0 for p in self.pool]
        teams = []
        for team, heap in heaps.items():
            heapq.heapify(heap)
            u = placed.setdefault(team, [0.0, 0.0, 0.0])
            teams.append((max(u[0] * inv[0], u[1] * inv[1], u[2] * inv[2]), team))
        heapq.heapify(teams)
        while teams:
            team = teams[0][1]
            heap = heaps[team]
            if not self.explain and self.exhausted(team):
                heapq.heappop(teams)  # the rest of its jobs would only wait
                continue
            j = heapq.heappop(heap)[-1]
            u = accumulate(placed[team], j.demand)
            if heap:
                heapq.heapreplace(teams, (max(u[0] * inv[0], u[1] * inv[1], u[2] * inv[2]), team))
            else:
                heapq.heappop(teams)
            yield j

    def run(self) -> None:
        """Walk the order, launching what may start; stop early unless explaining."""
        for job in self.order():
            self.place(job)
            if not self.explain and self.head is not None and not self.policy.backfill:
                return

    def exhausted(self, team: str) -> bool:
        """Whether none of `team`'s jobs left in the order can start, or matter, this pass.

        Checks the floor of those jobs, which errs towards walking on, against room that
        only shrinks during a pass, so a team found exhausted stays so. Before the head is
        known only a team holding its quota is dropped: any other job may become the head.
        """
        team_extra = self.team_extra.get(team)
        if self.head is None and team_extra is None:
            return False
        if team not in self.floors:
            jobs = [entry[-1] for entry in self.heaps[team]]
            runtimes = (j.expected_runtime for j in jobs if j.expected_runtime is not None)
            self.floors[team] = (
                min(j.demand.cpus for j in jobs),
                min(j.demand.memory_mib for j in jobs),
                min(j.demand.gpus for j in jobs),
                min(runtimes, default=math.inf),
            )
        floor = self.floors[team]
        if team_extra is None:
            caps, used = self.caps.get(team, _NO_CAPS), self.usage.get(team, [0.0, 0.0, 0.0])
            team_extra = [caps[k] - used[k] for k in range(3)]
        if not fits(floor, team_extra):
            return True
        if self.head is None:
            return False
        start = self.head_start
        ends_in_time = start is not None and self.now + floor[3] <= start + EPS
        return not fits(floor, self.free) or not (ends_in_time or fits(floor, self.extra))

    def place(self, job: QueuedJob) -> None:
        """Launch `job`, or record why it waits (only when explaining: strings cost time)."""
        d, team = job.demand.as_tuple(), job.team
        caps = self.caps.get(team, _NO_CAPS)
        if not (fits(d, self.pool) and fits(d, caps)):
            pool, quota = self.state.pool, self.state.quotas.get(team)
            return self.wait(job, lambda: f"never fits: {check_admissible(job, pool, quota)}")
        used = self.usage.setdefault(team, [0.0, 0.0, 0.0])
        team_extra = self.team_extra.get(team)
        if team_extra is not None:
            if not (self.policy.backfill and fits(d, team_extra)):
                first = self.team_head[team].id
                return self.wait(job, lambda: f"waiting: behind job {first} in team '{team}'")
        elif not fits([used[k] + d[k] for k in range(3)], caps):
            self.team_head[team] = job
            self.team_extra[team] = [max(0.0, caps[k] - used[k] - d[k]) for k in range(3)]
            if self.head is None:
                self.blocked.append(job)
            return self.wait(job, lambda: self.reason(job, d, used, caps))
        if self.head is None:
            if fits(d, self.free):
                return self.launch(job, d, used)
            self.reserve(job, d, used, caps)
            return self.wait(job, lambda: self.reason(job, d) + "; next in line")
        if not fits(d, self.free):
            return self.wait(job, lambda: self.reason(job, d))
        head, start = self.head.id, self.head_start
        if not self.policy.backfill:
            return self.wait(job, lambda: f"waiting: behind job {head}, next in line")
        runtime = job.expected_runtime
        if start is not None and runtime is not None and self.now + runtime <= start + EPS:
            return self.launch(job, d, used)
        if fits(d, self.extra):
            deduct(self.extra, d)
            return self.launch(job, d, used)
        when = f"in {start - self.now:.0f} s" if start is not None else "as running jobs end"
        return self.wait(job, lambda: f"waiting: would delay job {head}, due to start {when}")

    def launch(self, job: QueuedJob, d: Sequence[float], used: list[float]) -> None:
        deduct(self.free, d)
        accumulate(used, job.demand)
        if job.team in self.team_extra:
            deduct(self.team_extra[job.team], d)
        self.launched.append(job)
        self.decisions.append(Launch(job.id))

    def wait(self, job: QueuedJob, reason: Callable[[], str]) -> None:
        if self.explain:
            self.decisions.append(Wait(job.id, reason()))

    def reserve(
        self, head: QueuedJob, d: Sequence[float], used: list[float], caps: Sequence[float]
    ) -> None:
        """Make `head` the EASY head: find its start T and the extra left over at T."""
        self.head = head
        self.blocked.append(head)
        now, ends = self.now, []
        for r in self.state.running:
            if r.expected_end is not None:
                ends.append((max(r.expected_end, now), r.demand))
        for j in self.launched:
            if j.expected_runtime is not None:
                ends.append((now + j.expected_runtime, j.demand))
        free = list(self.free)
        for end, demand in sorted(ends, key=lambda e: e[0]):
            if fits(d, accumulate(free, demand)):
                self.head_start = end
                break
        else:
            free = self.free
        self.extra = [max(0.0, free[k] - d[k]) for k in range(3)]
        if head.team in self.team_extra:
            deduct(self.team_extra[head.team], d)
        else:
            self.team_head[head.team] = head
            self.team_extra[head.team] = [max(0.0, caps[k] - used[k] - d[k]) for k in range(3)]

    def reason(
        self,
        job: QueuedJob,
        d: Sequence[float],
        used: list[float] | None = None,
        caps: Sequence[float] = _NO_CAPS,
    ) -> str:
        """Why `job` waits, with the numbers: for its team quota if `used` is given, else pool."""
        if used is not None:
            short = [k for k in range(3) if used[k] + d[k] > caps[k] + EPS]
            return f"waiting: team '{job.team}' quota for " + "; ".join(
                f"{label(DIMS[k])} ({number(DIMS[k], used[k])} of {number(DIMS[k], caps[k])} "
                f"used, the job needs {number(DIMS[k], d[k])})"
                for k in short
            )
        short = [k for k in range(3) if d[k] > self.free[k] + EPS]
        return "waiting: pool has " + "; ".join(
            f"{number(DIMS[k], max(self.free[k], 0))} of {amount(DIMS[k], self.pool[k])} free, "
            f"the job needs {number(DIMS[k], d[k])}"
            for k in short
        )

    def preemptions(self) -> list[Decision]:
        """Same-team preemptions for the jobs up to the head; see the module docstring."""
        decisions: list[Decision] = []
        free, taken = list(self.free), set()
        for job in self.blocked:
            d, used = job.demand.as_tuple(), self.usage[job.team]
            caps = self.caps.get(job.team, _NO_CAPS)
            candidates = [
                r
                for r in self.running_by_team.get(job.team, ())
                if r.preemptible and r.priority < job.priority and r.id not in taken
            ]
            chosen: list[RunningJob] = []
            for victim in sorted(candidates, key=lambda r: (r.priority, -r.started, r.id)):
                if _fits_without(d, chosen, free, used, caps):
                    break
                chosen.append(victim)
            if not chosen or not _fits_without(d, chosen, free, used, caps):
                continue
            for victim in reversed(chosen[:-1]):  # the last one was needed: spare the rest
                rest = [v for v in chosen if v is not victim]
                chosen = rest if _fits_without(d, rest, free, used, caps) else chosen
            for victim in chosen:
                taken.add(victim.id)
                accumulate(free, victim.demand)
                deduct(used, victim.demand.as_tuple())
                why = f"for job {job.id} of team '{job.team}' ({job.priority} > {victim.priority})"
                decisions.append(Preempt(victim.id, f"preempted {why}"))
            deduct(free, d)
            accumulate(used, job.demand)
        return decisions


def _fits_without(
    d: Sequence[float],
    victims: list[RunningJob],
    free: list[float],
    used: list[float],
    caps: Sequence[float],
) -> bool:
    """Whether demand `d` fits both the free pool and the team's quota once `victims` stop."""
    freed = [0.0, 0.0, 0.0]
    for v in victims:
        accumulate(freed, v.demand)
    return fits(d, [min(free[k] + freed[k], caps[k] - used[k] + freed[k]) for k in range(3)])
