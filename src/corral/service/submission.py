"""Queueing a job and cancelling one: what a submission over the API and a search's
trial both do, so both are admitted and stopped by the same rules."""

from __future__ import annotations

import time
from typing import Any

from corral.errors import SpecError
from corral.runtime.resources import Resources
from corral.service.cluster import demand_of
from corral.service.job import check_files
from corral.service.scheduler import QueuedJob, check_admissible
from corral.service.store import FINAL, Job, Store, User
from corral.spec import AnyJobSpec, parse_job


class Refused(SpecError):
    """The job could never run: it is larger than the pool or its team's quota."""


def admit(
    store: Store, pool: Resources, user: User, spec: dict[str, Any]
) -> tuple[AnyJobSpec, Resources]:
    """The job a spec describes and its demand, if it could ever run for `user`.

    Raises:
        SpecError: a bad spec, or missing data.
        Refused: a job larger than the pool or the team's quota.
    """
    job = parse_job(spec, source="spec")
    check_files(job)  # missing data fails here, not after its restarts
    demand = demand_of(job)
    probe = QueuedJob(id="new", team=user.team, demand=demand, submitted=time.time())
    refused = check_admissible(probe, pool, store.quota(user.team))
    if refused:
        raise Refused(f"refused: {refused}")
    return job, demand


def queue(
    store: Store,
    pool: Resources,
    user: User,
    spec: dict[str, Any],
    *,
    priority: int = 0,
    client_key: str | None = None,
    preemptible: bool = False,
    expected_runtime: float | None = None,
) -> Job:
    """Validate a job, admit it and store it: the job queued, or the job its
    `client_key` made before (`Store.add_job`).

    Raises:
        SpecError: a bad spec, or missing data.
        Refused: a job no pass of the scheduler could ever start.
    """
    job, demand = admit(store, pool, user, spec)
    made, _ = store.add_job(
        user=user,
        name=job.name,
        spec=job.model_dump(mode="json"),
        demand=demand,
        priority=priority,
        max_restarts=job.max_restarts,
        client_key=client_key,
        preemptible=preemptible,
        expected_runtime=expected_runtime,
    )
    return made


def cancel(store: Store, job: Job, reason: str) -> None:
    """Stop a job: a queued one is cancelled here; the runner stops a running one."""
    if job.state not in FINAL:
        store.request_cancel(job.id, reason)
        store.transition(job.id, ["queued"], "cancelled", reason)
