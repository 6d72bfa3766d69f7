"""The scheduler's view of the store, and the pool it schedules: what a job asks for,
what this machine has, and the `ClusterState` of one scheduling pass."""

from __future__ import annotations

import dataclasses
import os
import time

from corral.engines.local import available_gpus
from corral.errors import CorralError
from corral.runtime.resources import Resources, total_demand
from corral.service.scheduler import ClusterState, QueuedJob, RunningJob
from corral.service.store import Store
from corral.spec import AnyJobSpec, RoleSpec, parse

#: Memory counted for a process whose role names none: the scheduler must count something,
#: or a pool's memory would never fill.
DEFAULT_PROCESS_MIB = 1024


def demand_of(spec: AnyJobSpec) -> Resources:
    """The whole job's demand: every process of every role of its plan, all at once (gang),
    as `Trainer` will launch them."""
    return total_demand(
        (
            r.count,
            dataclasses.replace(
                r.resources, memory_mib=r.resources.memory_mib or DEFAULT_PROCESS_MIB
            ),
        )
        for r in spec.plan().roles
    )


def machine_pool() -> Resources:
    """This machine: its CPUs, its memory, and the GPUs the server may hand out."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return Resources(cpus=os.cpu_count() or 1, memory_mib=memory, gpus=len(available_gpus()))


def spark_pool(master: str, conf: dict[str, str], wait_s: float = 60.0) -> Resources:
    """The Spark cluster's capacity, read once by a short-lived application of its own:
    the cores its executors offer, and their memory. The application is stopped at once,
    so it holds nothing the jobs need."""
    from corral.engines.spark import _default_task, session, task_slots

    spark = session(master, {**conf, "spark.app.name": "corral-capacity"})
    try:
        sc = spark.sparkContext
        deadline = time.monotonic() + wait_s
        while task_slots(sc) == 0:  # executors register a moment after the application
            if time.monotonic() > deadline:
                raise CorralError(f"no executor of the Spark cluster at {master} registered")
            time.sleep(0.5)
        executors = sc._jsc.sc().getExecutorMemoryStatus().size() - (  # type: ignore[union-attr]
            0 if master.startswith("local") else 1  # the driver is listed too
        )
        conf_of = sc.getConf()
        per_executor = parse(RoleSpec, {"memory": conf_of.get("spark.executor.memory", "1g")})
        gpus = float(conf_of.get("spark.executor.resource.gpu.amount", "0") or 0)
        return Resources(
            cpus=task_slots(sc) * _default_task(sc).cpus,
            memory_mib=max(1, executors) * (per_executor.memory or 1024),
            gpus=int(max(1, executors) * gpus),
        )
    finally:
        spark.stop()


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
