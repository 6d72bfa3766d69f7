"""What the REST API and the web UI both show, computed once for both.

A user sees only their own team's jobs: `visible_job` answers another team's job with the
same 404 as a job that does not exist, so ids leak nothing, and the API's routes and the
UI's pages both go through it. `cluster_view` is GET /api/cluster and the cluster page.
`newest_checkpoint` is the file GET /api/jobs/{id}/checkpoint serves and the job page
links to. Both `corral.service.api` and `corral.service.ui` import this module, and it
imports neither.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import HTTPException, status

from corral.federation.wire import JoinAddress
from corral.runtime import checkpoint as ckpt
from corral.runtime.resources import Resources
from corral.service.cluster import cluster_state
from corral.service.job import CHECKPOINTS, FEDERATION, TRACKING
from corral.service.models import Cluster, Demand, QueueEntry, QuotaBody, TeamUsage
from corral.service.resources import Quota
from corral.service.scheduler import Launch, Policy, explain
from corral.service.store import Job, Store, User

#: The states of a job that has not ended: what lists show unless asked for all.
ACTIVE = ("queued", "running", "restarting")
_JOB_ID = re.compile(r"[0-9a-f]{1,16}")

#: Where a job's files are (the runner's folder for it), by job id.
JobFolder = Callable[[str], Path]


def visible_job(store: Store, user: User, job_id: str) -> Job:
    """The job, if `user` may see it; otherwise the same 404 as for no job at all."""
    job = store.job(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None or (job.team != user.team and not user.admin):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job '{job_id}'")
    return job


def newest_checkpoint(job_folder: JobFolder | None, job: Job) -> Path | None:
    """The job's newest checkpoint (its last, once it has ended); None before its first,
    or on a server that keeps no job files (`job_folder` None: an API without a runner)."""
    return None if job_folder is None else ckpt.latest(job_folder(job.id) / CHECKPOINTS)


def join_address(job_folder: JobFolder | None, job: Job) -> JoinAddress | None:
    """Where real clients join the job (``federation``), token included: for the job's
    team only (callers have scoped `job` with `visible_job`); None before its aggregator
    first listened, or for a job without real clients."""
    if job_folder is None or job.spec.get("federation") is None:
        return None
    return JoinAddress.enrolled(job_folder(job.id) / FEDERATION)


def tracking_url(job_folder: JobFolder | None, job: Job) -> str | None:
    """The address of the job's MLflow run page, once its first attempt made the run
    (None without an MLflow server, or before)."""
    if job_folder is None:
        return None
    try:
        return json.loads((job_folder(job.id) / TRACKING).read_text()).get("url")
    except (OSError, ValueError):
        return None


def demand_body(resources: Resources) -> Demand:
    return Demand(
        cpus=resources.cpus, memory_mib=int(resources.memory_mib), gpus=int(resources.gpus)
    )


def quota_body(q: Quota | None) -> QuotaBody | None:
    return None if q is None else QuotaBody(cpus=q.cpus, memory_mib=q.memory_mib, gpus=q.gpus)


def used_by(jobs: list[Job]) -> Resources:
    """What `jobs` hold of the pool together."""
    return sum((job.demand for job in jobs), Resources())


def cluster_view(store: Store, pool: Resources, policy: Policy, user: User) -> Cluster:
    """The pool, each team's use against its quota, and the queue in scheduling order with
    why each job waits, as `user` may see it: another team's queued job shows its team and
    place only."""
    state = cluster_state(store, pool)
    by_team: dict[str, list[Any]] = {}
    for r in state.running:
        by_team.setdefault(r.team, []).append(r)
    queued_by_team: dict[str, int] = {}
    for q in state.queued:
        queued_by_team[q.team] = queued_by_team.get(q.team, 0) + 1
    teams = sorted(set(by_team) | set(queued_by_team))
    usage = [
        TeamUsage(
            team=team,
            used=demand_body(sum((r.demand for r in by_team.get(team, [])), Resources())),
            quota=quota_body(state.quotas.get(team)),
            running=len(by_team.get(team, [])),
            queued=queued_by_team.get(team, 0),
        )
        for team in teams
    ]
    jobs_by_id = {j.id: j for j in store.jobs(states=["queued"])}
    queue = []
    for position, decision in enumerate(explain(state, time.time(), policy)):
        job = jobs_by_id.get(decision.job_id)
        if job is None:
            continue
        mine = user.admin or job.team == user.team
        reason = "starts at the next pass" if isinstance(decision, Launch) else decision.reason
        queue.append(
            QueueEntry(
                position=position + 1,
                team=job.team,
                id=job.id if mine else None,
                name=job.name if mine else None,
                reason=reason if mine else "",
            )
        )
    used = sum((r.demand for r in state.running), Resources())
    return Cluster(pool=demand_body(pool), used=demand_body(used), teams=usage, queue=queue)
