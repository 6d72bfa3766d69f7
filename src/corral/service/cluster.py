"""The scheduler's view of the store, and the pool it schedules: what a job asks for,
what this machine has, and the `ClusterState` of one scheduling pass."""

from __future__ import annotations

import os
import time

from corral.engines.local import available_gpus
from corral.service.resources import Resources, total_demand
from corral.service.scheduler import ClusterState, QueuedJob, RunningJob
from corral.service.store import Store
from corral.spec import JobSpec, RoleSpec

#: Memory counted for a process whose role names none: the scheduler must count something,
#: or a pool's memory would never fill.
DEFAULT_PROCESS_MIB = 1024


def demand_of(spec: JobSpec) -> Resources:
    """The whole job's demand: every process of every role, all at once (gang)."""
    roles = [spec.roles.worker]
    servers = getattr(spec.strategy, "servers", None)
    if spec.roles.server is not None:
        roles.append(spec.roles.server)
    elif servers:  # a parameter-server job that sizes no servers: one CPU each
        roles.append(RoleSpec(count=servers))
    return total_demand(
        (
            r.count,
            Resources(cpus=r.cpus, memory_mib=r.memory or DEFAULT_PROCESS_MIB, gpus=r.gpus),
        )
        for r in roles
    )


def machine_pool() -> Resources:
    """This machine: its CPUs, its memory, and the GPUs the server may hand out."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return Resources(cpus=os.cpu_count() or 1, memory_mib=memory, gpus=len(available_gpus()))


def cluster_state(store: Store, pool: Resources) -> ClusterState:
    """One pass's input, read from the store: running jobs hold resources, queued wait."""
    running, queued = [], []
    for job in store.jobs(states=["queued", "running", "restarting"], with_spec=False):
        if job.state == "queued":
            queued.append(
                QueuedJob(
                    id=job.id,
                    team=job.team,
                    user=job.user,
                    demand=job.demand,
                    submitted=job.submitted,
                    priority=job.priority,
                    expected_runtime=job.expected_runtime,
                )
            )
        else:
            running.append(
                RunningJob(
                    id=job.id,
                    team=job.team,
                    demand=job.demand,
                    started=job.started or time.time(),
                    priority=job.priority,
                    preemptible=job.preemptible,
                    expected_end=(job.started or time.time()) + job.expected_runtime
                    if job.expected_runtime
                    else None,
                )
            )
    return ClusterState(pool=pool, quotas=store.quotas(), running=running, queued=queued)
