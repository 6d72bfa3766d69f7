"""The REST API's request and response bodies (they are its OpenAPI schema, too)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # the CLI imports these models without the database layer
    from corral.service.store import Event, Job


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """An error: one line of English, or FastAPI's list of field errors."""

    detail: str | list[dict[str, Any]]


class SubmitRequest(_Body):
    spec: dict[str, Any] = Field(description="a job spec, as in a YAML job file")
    priority: int = Field(
        0, ge=-1000, le=1000, strict=True, description="higher runs first in its team"
    )
    preemptible: bool = Field(
        False, description="may be stopped and requeued (it resumes from its checkpoint)"
    )
    expected_runtime_s: float | None = Field(
        None, gt=0, le=10**8, description="how long it should run: lets it backfill holes"
    )
    client_key: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="the same key from the same user returns the job it made",
    )


class Demand(BaseModel):
    cpus: float
    memory_mib: int
    gpus: int


class JobOut(BaseModel):
    id: str
    name: str
    user: str
    team: str
    state: str
    priority: int
    demand: Demand
    attempts: int
    max_restarts: int
    submitted: float
    started: float | None
    ended: float | None
    reason: str
    preemptible: bool
    url: str

    @classmethod
    def of(cls, job: Job, base_url: str) -> JobOut:
        d = job.demand
        return cls(
            id=job.id,
            name=job.name,
            user=job.user,
            team=job.team,
            state=job.state,
            priority=job.priority,
            demand=Demand(cpus=d.cpus, memory_mib=int(d.memory_mib), gpus=int(d.gpus)),
            attempts=job.attempts,
            max_restarts=job.max_restarts,
            submitted=job.submitted,
            started=job.started,
            ended=job.ended,
            reason=job.reason,
            preemptible=job.preemptible,
            url=f"{base_url}/jobs/{job.id}",
        )


class EventOut(BaseModel):
    at: float
    state: str
    reason: str

    @classmethod
    def of(cls, e: Event) -> EventOut:
        return cls(at=e.at, state=e.state, reason=e.reason)


class JobDetail(JobOut):
    spec: dict[str, Any]
    events: list[EventOut]
    metrics: list[dict[str, Any]]


class LogPage(BaseModel):
    lines: list[str]
    next: int = Field(description="pass as ?after= to get the lines after these")
    final: bool = Field(description="the job has ended: no more lines will come")


class JoinOut(BaseModel):
    url: str = Field(description="the job's join address; it holds its enrolment token")
    command: str = Field(description="what a client runs, with its copy of the job spec")


class QuotaBody(_Body):
    # upper bounds both databases hold (PostgreSQL's INTEGER is 32 bits)
    cpus: float | None = Field(None, ge=0, le=1e9)
    memory_mib: int | None = Field(None, ge=0, le=2**50)
    gpus: int | None = Field(None, ge=0, le=2**31 - 1)


class QuotaOut(BaseModel):
    team: str
    quota: QuotaBody
    used: Demand


class Me(BaseModel):
    name: str
    team: str
    admin: bool


class TeamBody(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class UserBody(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    team: str = Field(min_length=1, max_length=64)
    admin: bool = False


class NewUser(Me):
    token: str = Field(description="shown once: only its hash is stored")


class QueueEntry(BaseModel):
    position: int
    team: str
    id: str | None = Field(description="null for another team's job")
    name: str | None
    reason: str


class TeamUsage(BaseModel):
    team: str
    used: Demand
    quota: QuotaBody | None
    running: int
    queued: int


class Cluster(BaseModel):
    pool: Demand
    used: Demand
    teams: list[TeamUsage]
    queue: list[QueueEntry]


class TrialOut(BaseModel):
    """One trial of a search."""

    number: int
    state: str = Field(
        description="queued or restarting (its job waits), running, complete, pruned or fail"
    )
    params: dict[str, Any]
    value: float | None = Field(description="its last reported value of the metric")
    epochs: int = Field(description="epochs it reported")
    history: list[float] = Field(description="the metric at each epoch it reported")
    job: str | None = Field(description="its job's id")
    reason: str = Field(description="why it failed or was pruned")


class SearchOut(BaseModel):
    id: str
    name: str
    user: str
    team: str
    state: str = Field(description="running, succeeded, failed or cancelled")
    reason: str
    created: float
    ended: float | None
    metric: str
    mode: str
    trials: int = Field(description="trials the search runs in all")


class SearchDetail(SearchOut):
    request: dict[str, Any] = Field(description="the search as submitted: spec, space, settings")
    trial_list: list[TrialOut]
    best: TrialOut | None = Field(description="the best completed trial so far")
    best_spec: dict[str, Any] | None = Field(
        description="the best trial's job spec, ready for corral train or submit"
    )
    importance: dict[str, float] = Field(
        description="each parameter's importance to the metric (fANOVA), once trials completed"
    )
