"""The REST API (``/api``) and the app that serves it beside the web UI, on one port.

Every route asks who is calling (`corral.service.auth`). A user sees, follows, cancels and
downloads the checkpoints of only their own team's jobs. Another team's job answers 404,
exactly as a job that does not exist, so ids leak nothing (`corral.service.views`). Only
admins manage teams, users and quotas. A spec is validated with the same model as
``corral train`` (`corral.spec.JobSpec`): a wrong field is a 422 that names it. A job
that could never fit the pool or its team's quota is refused at submit, with the numbers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.errors import SpecError
from corral.runtime.resources import Resources
from corral.service import submission
from corral.service.auth import AdminUser, CurrentUser
from corral.service.mlflow_auth import MlflowAuthError, MlflowLogin, TeamAccess
from corral.service.models import (
    Cluster,
    EventOut,
    JobDetail,
    JobOut,
    JoinOut,
    LogPage,
    Me,
    NewUser,
    Problem,
    QuotaBody,
    QuotaOut,
    SubmitRequest,
    TeamBody,
    UserBody,
)
from corral.service.resources import Quota
from corral.service.scheduler import Policy
from corral.service.search_api import search_router
from corral.service.store import Job, Store, StoreError, User
from corral.service.ui import ui_router
from corral.service.views import (
    ACTIVE,
    JobFolder,
    cluster_view,
    demand_body,
    join_address,
    newest_checkpoint,
    quota_body,
    used_by,
    visible_job,
)

#: The largest request body accepted: a job spec is a few kilobytes.
MAX_BODY = 1 << 20
State = Literal["queued", "running", "restarting", "succeeded", "failed", "cancelled"]


class _BodyLimit:
    """Refuse oversize bodies before reading them (413), and bodies streamed without a
    declared length (411), whose size could only be known by reading them.

    A plain ASGI middleware: it looks at the headers and hands the request on untouched.
    As a `BaseHTTPMiddleware` it cost about 0.4 ms of the server's CPU per request (a task
    and two memory streams around every call; docs/benchmarks.md)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = _refusal(scope["headers"])
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _refusal(headers: list[tuple[bytes, bytes]]) -> Response | None:
    """The answer to a request whose headers alone refuse it; None for one that may go on.
    The first Content-Length counts, as `Request.headers.get` would read it."""
    declared: bytes | None = None
    streamed = False
    for name, value in headers:
        if name == b"content-length":
            if declared is None:
                declared = value
        elif name == b"transfer-encoding":
            streamed = True
    if declared is not None:
        text = declared.decode("latin-1")
        if not text.isdigit() or int(text) > MAX_BODY:
            return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, 413)
    elif streamed:
        return JSONResponse({"detail": "send the body with a Content-Length"}, 411)
    return None


def _submit(store: Store, pool: Resources, user: User, body: SubmitRequest) -> Job:
    """The job a submission queued, or the job its `client_key` made before."""
    try:
        return _queue(store, pool, user, body)
    except Exception:
        # a retry: the job its key made, whatever changed since (a spec or quota that would
        # refuse it now). Looked up only for a submission that cannot be queued: one that
        # can is stored once on its key by `Store.add_job`, which answers that same job
        made = None if body.client_key is None else store.job_by_key(user.name, body.client_key)
        if made is None:
            raise
        return made


def _queue(store: Store, pool: Resources, user: User, body: SubmitRequest) -> Job:
    """Validate a submission, admit it and store it (`submission.queue`): the job it
    queued, or the job its `client_key` made before; 422 for a bad spec or a refusal."""
    try:
        return submission.queue(
            store,
            pool,
            user,
            body.spec,
            priority=body.priority,
            client_key=body.client_key,
            preemptible=body.preemptible,
            expected_runtime=body.expected_runtime_s,
        )
    except SpecError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def router() -> APIRouter:
    api = APIRouter(prefix="/api")

    def store_of(request: Request) -> Store:
        return request.app.state.store  # type: ignore[no-any-return]

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @api.get("/me")
    def me(user: CurrentUser) -> Me:
        return Me(name=user.name, team=user.team, admin=user.admin)

    @api.post(
        "/me/mlflow",
        responses={
            404: {"model": Problem, "description": "this server tracks no jobs in MLflow"},
            503: {"model": Problem, "description": "MLflow refused, or did not answer"},
        },
    )
    def mlflow_login(user: CurrentUser, request: Request) -> MlflowLogin:
        """Where your team's runs are, and a login of your own that reads them: a new
        password at each call (the one before stops working), which corral keeps nowhere.
        A POST, for it changes that password. No login on an MLflow without users."""
        uri: str | None = request.app.state.mlflow_uri
        access: TeamAccess | None = request.app.state.mlflow
        if uri is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "this server tracks no jobs in MLflow")
        if access is None:
            return MlflowLogin(uri=uri, experiment=user.team)
        try:
            return access.person_login(user.name, user.team)
        except MlflowAuthError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None

    @api.post(
        "/jobs",
        status_code=status.HTTP_201_CREATED,
        responses={422: {"model": Problem, "description": "invalid spec, or refused"}},
    )
    async def submit(body: SubmitRequest, user: CurrentUser, request: Request) -> JobOut:
        # async, with the store's work in one worker thread: a sync route would take a
        # second thread hop to serialise its answer
        pool = request.app.state.pool
        job = await run_in_threadpool(_submit, store_of(request), pool, user, body)
        return JobOut.of(job, base_url(request))

    @api.get("/jobs")
    def jobs(
        user: CurrentUser,
        request: Request,
        state: Annotated[list[State] | None, Query(description="only these states")] = None,
        owner: Annotated[
            str | None, Query(alias="user", max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
        ] = None,
        all_states: Annotated[bool, Query(description="include ended jobs")] = False,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
    ) -> list[JobOut]:
        states: list[str] | None = list(state) if state else None
        if states is None and not all_states:
            states = list(ACTIVE)
        team = None if user.admin else user.team
        found = store_of(request).jobs(team=team, states=states, user=owner, limit=limit)
        return [JobOut.of(j, base_url(request)) for j in found]

    @api.get("/jobs/{job_id}")
    def job(job_id: str, user: CurrentUser, request: Request) -> JobDetail:
        store = store_of(request)
        found = visible_job(store, user, job_id)
        return JobDetail(
            **JobOut.of(found, base_url(request)).model_dump(),
            spec=found.spec,
            events=[EventOut.of(e) for e in store.events(job_id)],
            metrics=store.metrics(job_id),
        )

    @api.get("/jobs/{job_id}/logs")
    def logs(
        job_id: str,
        user: CurrentUser,
        request: Request,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> LogPage:
        store = store_of(request)
        found = visible_job(store, user, job_id)
        page = store.logs(job_id, after)
        return LogPage(lines=page.lines, next=page.next, final=found.final)

    @api.get(
        "/jobs/{job_id}/checkpoint",
        response_class=FileResponse,
        responses={
            200: {
                "content": {"application/octet-stream": {}},
                "description": "the newest checkpoint file, as the job wrote it",
            },
            404: {"model": Problem, "description": "no such job, or no checkpoint yet"},
        },
    )
    def checkpoint(job_id: str, user: CurrentUser, request: Request) -> FileResponse:
        """The job's newest checkpoint (its final one once it has ended): a ``torch.save``
        of a dict whose ``"model"`` is the model's state_dict; ``corral model`` saves it."""
        found = visible_job(store_of(request), user, job_id)
        path = newest_checkpoint(request.app.state.job_folder, found)
        if path is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"job '{job_id}' has no checkpoint yet ({found.state})"
            )
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    @api.get(
        "/jobs/{job_id}/join",
        responses={404: {"model": Problem, "description": "no such job, or none to join"}},
    )
    def join(job_id: str, user: CurrentUser, request: Request) -> JoinOut:
        """Where real clients join a job with ``federation``: its address and enrolment
        token, shown to the job's own team only (another team's job is a 404)."""
        found = visible_job(store_of(request), user, job_id)
        address = join_address(request.app.state.job_folder, found)
        if address is None:
            why = (
                "serves no real clients"
                if not found.spec.get("federation")
                else f"is not listening for clients yet ({found.state})"
            )
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job '{job_id}' {why}")
        url = address.url()
        return JoinOut(url=url, command=f"corral fl join '{url}' --job {found.name}.yaml")

    @api.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str, user: CurrentUser, request: Request) -> JobOut:
        store = store_of(request)
        found = visible_job(store, user, job_id)
        submission.cancel(store, found, f"cancelled by {user.name}")
        return JobOut.of(store.job(job_id) or found, base_url(request))

    @api.get("/quota")
    def quota(user: CurrentUser, request: Request) -> QuotaOut:
        store = store_of(request)
        q = store.quotas().get(user.team) or Quota()
        running = store.jobs(team=user.team, states=["running", "restarting"])
        return QuotaOut(team=user.team, quota=quota_body(q), used=demand_body(used_by(running)))

    @api.get("/cluster")
    def cluster(user: CurrentUser, request: Request) -> Cluster:
        app = request.app
        return cluster_view(store_of(request), app.state.pool, app.state.policy, user)

    @api.get("/admin/teams")
    def teams(_: AdminUser, request: Request) -> list[str]:
        return store_of(request).teams()

    @api.post("/admin/teams", status_code=status.HTTP_201_CREATED)
    def add_team(body: TeamBody, _: AdminUser, request: Request) -> list[str]:
        store = store_of(request)
        try:
            store.create_team(body.name)
        except StoreError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return store.teams()

    @api.get("/admin/users")
    def users(_: AdminUser, request: Request) -> list[Me]:
        return [Me(name=u.name, team=u.team, admin=u.admin) for u in store_of(request).users()]

    @api.post("/admin/users", status_code=status.HTTP_201_CREATED)
    def add_user(body: UserBody, _: AdminUser, request: Request) -> NewUser:
        if body.team not in store_of(request).teams():
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no team '{body.team}'")
        try:
            made, token = store_of(request).create_user(body.name, body.team, admin=body.admin)
        except StoreError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return NewUser(name=made.name, team=made.team, admin=made.admin, token=token)

    @api.put("/admin/quotas/{team}")
    def set_quota(team: str, body: QuotaBody, _: AdminUser, request: Request) -> QuotaOut:
        store = store_of(request)
        try:
            store.set_quota(team, Quota(cpus=body.cpus, memory_mib=body.memory_mib, gpus=body.gpus))
        except StoreError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        running = store.jobs(team=team, states=["running", "restarting"])
        return QuotaOut(team=team, quota=body, used=demand_body(used_by(running)))

    return api


def create_app(
    store: Store,
    *,
    pool: Resources,
    policy: Policy | None = None,
    job_folder: JobFolder | None = None,
    mlflow_uri: str | None = None,
    mlflow: TeamAccess | None = None,
) -> FastAPI:
    """The service's app: the API here, the web UI mounted beside it. `job_folder` says
    where the runner keeps a job's files (its checkpoints); without it, no job has any.
    `mlflow_uri` is where jobs are tracked, and `mlflow` gives people their logins there
    (``POST /api/me/mlflow``)."""
    app = FastAPI(
        title="corral",
        description="Multi-user job service for distributed PyTorch training.",
        version="0.1.0",
    )
    app.state.store, app.state.pool, app.state.policy = store, pool, policy or Policy()
    app.state.job_folder = job_folder
    app.state.mlflow_uri, app.state.mlflow = mlflow_uri, mlflow
    app.add_middleware(_BodyLimit)
    app.include_router(router())
    app.include_router(search_router())
    app.include_router(ui_router())
    return app
