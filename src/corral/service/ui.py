"""The web UI (issue 5): server-rendered pages on the API's port, for people not scripts.

Pages read through the same helpers as the API (`corral.service.views`): `visible_job`
scopes a job to its team (another team's job is the same 404 page as no job),
`cluster_view` is GET /api/cluster, so the UI shows nothing the API would not. The token
travels only in the HttpOnly, SameSite=Strict cookie that the login form sets, never in a
URL or a page; a page without a valid one redirects to the login form. Templates
autoescape everything. The one script, inline and allowed by a per-response CSP nonce,
keeps an active job's page live: every 2 s it asks GET /api/jobs/{id} whether the job is
still active and swaps in the server-drawn panel (timeline, attempts, charts, log tail)
from ``/jobs/{id}/live``; it stops once the job ends. The charts (loss, on a log scale
unless switched to linear; validation accuracy; samples/s) are SVG drawn here from the
job's metric rows, so no chart library is shipped and nothing is fetched from elsewhere.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

import jinja2
import yaml
from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from corral.service.auth import COOKIE, current_user
from corral.service.resources import number
from corral.service.store import FINAL, STATES, Event, Store, User
from corral.service.views import (
    ACTIVE,
    cluster_view,
    newest_checkpoint,
    tracking_url,
    visible_job,
)
from corral.train.progress import format_metrics

#: Lines of the log shown on a job's page.
LOG_TAIL = 200
#: Rows in the jobs table: the newest first.
JOBS_SHOWN = 500
#: Chart panel size in SVG user units, and its margins (left for the value labels).
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 440, 170, 56, 14, 14, 26

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("corral.service", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# -- pure helpers: what the templates show ----------------------------------------------


def when(t: float | None) -> str:
    """A time as the server's local wall clock, to the second; a dash for none."""
    return "—" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def duration(seconds: float | None) -> str:
    """``"4.2 s"``, ``"3 min 05 s"``, ``"2 h 01 min"``; a dash for none."""
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def demand_text(cpus: float, memory_mib: float, gpus: float) -> str:
    """``"2 CPU · 2 GiB"``, GPUs only when there are some, in the scheduler's numbers."""
    parts = [f"{number('cpus', cpus)} CPU", number("memory_mib", memory_mib)]
    if gpus:
        parts.append(f"{number('gpus', gpus)} GPU")
    return " · ".join(parts)


def percent(used: float, of: float | None) -> int:
    """How full a bar is, 0–100; an uncapped or empty total shows empty."""
    if not of:
        return 0
    return max(0, min(100, round(100 * used / of)))


@dataclass(frozen=True)
class Attempt:
    """One run of a job's process, from its ``running`` event to the event that ended it."""

    number: int
    started: float
    ended: float | None
    outcome: str
    reason: str


def attempts_of(events: list[Event]) -> list[Attempt]:
    """The attempts in a job's event history: each ``running`` event starts one, the next
    event (succeeded, failed, restarting, cancelled, or queued on preemption) ends it."""
    found: list[Attempt] = []
    start: Event | None = None
    for e in events:
        if e.state == "running":
            start = e
        elif start is not None:
            found.append(Attempt(len(found) + 1, start.at, e.at, e.state, e.reason))
            start = None
    if start is not None:
        found.append(Attempt(len(found) + 1, start.at, None, "running", start.reason))
    return found


@dataclass(frozen=True)
class Drawing:
    """A panel's line on one y scale (``linear`` or ``log``), in SVG coordinates."""

    scale: str
    path: str
    marks: list[tuple[float, float]]
    y_labels: list[tuple[float, str]]


@dataclass(frozen=True)
class Panel:
    """One chart: a metric against seconds since the first report. It holds one drawing,
    or two (log scale first, shown unless switched) that the page toggles between."""

    key: str
    title: str
    drawings: list[Drawing]
    x_labels: list[tuple[float, str]]
    last: str


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _drawing(
    points: list[tuple[float, float, bool]],
    x: Callable[[float], float],
    lo: float,
    hi: float,
    *,
    log: bool,
) -> Drawing:
    """The line through `points` with values from `lo` (bottom) to `hi` (top), labelled at
    both ends and the middle; on a log scale, `lo` and `hi` are powers of ten."""
    inner_h = HEIGHT - TOP - BOTTOM

    def y(v: float) -> float:
        return round(TOP + inner_h * (1 - (v - lo) / (hi - lo)), 1)

    def shown(v: float) -> str:
        return _fmt(10**v if log else v)

    values = [(t, math.log10(v) if log else v, epoch) for t, v, epoch in points]
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(t)},{y(v)}" for i, (t, v, _) in enumerate(values))
    mid = (lo + hi) / 2
    return Drawing(
        scale="log" if log else "linear",
        path=path,
        marks=[(x(t), y(v)) for t, v, epoch in values if epoch],
        y_labels=[(y(hi), shown(hi)), (y(mid), shown(mid)), (y(lo), shown(lo))],
    )


def _widen(lo: float, hi: float, by: float) -> tuple[float, float]:
    """A flat line gets a range around it, so it is drawn mid-height, not off the chart."""
    return (lo - by, hi + by) if hi - lo < 1e-12 else (lo, hi)


def panel(
    rows: list[dict[str, Any]],
    key: str,
    title: str,
    *,
    from_zero: bool = False,
    bounds: tuple[float, float] | None = None,
    log: bool = False,
) -> Panel | None:
    """`key` of the metric `rows` over time as a polyline, epoch rows marked; None if no
    row has it. Progress ticks and epoch summaries share the line, in time order. The y
    range is `bounds` if given, else the data's (from 0 with `from_zero`). With `log`, and
    values all above 0, a log-scale drawing comes first, the linear one second."""
    points = sorted(
        (float(r["time"]), float(r[key]), r.get("kind") == "epoch")
        for r in rows
        if isinstance(r.get("time"), int | float)
        and isinstance(r.get(key), int | float)
        and math.isfinite(r[key])
    )
    if not points:
        return None
    t0, t1 = points[0][0], points[-1][0]
    span = max(t1 - t0, 1e-9)
    inner_w = WIDTH - LEFT - RIGHT

    def x(t: float) -> float:
        return round(LEFT + inner_w * ((t - t0) / span if len(points) > 1 else 0.5), 1)

    low, high = min(v for _, v, _ in points), max(v for _, v, _ in points)
    if bounds is not None:
        lo, hi = bounds
    else:
        lo, hi = _widen(0.0 if from_zero else low, high, 0.5 * abs(high) or 0.5)
        lo = max(lo, 0.0) if from_zero else lo
    drawings = [_drawing(points, x, lo, hi, log=False)]
    if log and low > 0:
        decades = _widen(math.floor(math.log10(low)), math.ceil(math.log10(high)), 1)
        drawings.insert(0, _drawing(points, x, *decades, log=True))
    return Panel(
        key=key,
        title=title,
        drawings=drawings,
        x_labels=[(x(t0), "0 s"), (x(t1), duration(t1 - t0))] if len(points) > 1 else [],
        last=_fmt(points[-1][1]),
    )


def chart(rows: list[dict[str, Any]]) -> list[Panel]:
    """The job page's panels: training loss (log scale, or linear), validation accuracy
    (when the job validates), and throughput (samples/s over all workers)."""
    panels = [
        panel(rows, "loss", "loss", log=True),
        panel(rows, "val_accuracy", "validation accuracy", bounds=(0.0, 1.0)),
        panel(rows, "samples_per_s", "samples/s", from_zero=True),
    ]
    return [p for p in panels if p is not None]


#: A log line that holds a JSON object after a label: the job's ``done: {...}`` line.
_LABELLED_JSON = re.compile(r"(?P<label>[A-Za-z][\w ]*): (?P<body>\{.*\})")


def log_text(line: str) -> str:
    """A log line for people: ``done: {"loss": 0.1, …}`` as ``done: loss=0.1 …``, in the
    order and rounding of the epoch lines above it; any other line as it is."""
    found = _LABELLED_JSON.fullmatch(line)
    if found is None:
        return line
    try:
        values = json.loads(found["body"])
    except ValueError:
        return line
    return f"{found['label']}: {format_metrics(values)}" if isinstance(values, dict) else line


def local_path(target: str | None) -> str:
    """Where to go after login: a path on this server only, never another site."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


# -- rendering ------------------------------------------------------------------------

_env.filters.update(when=when, duration=duration, log_text=log_text)
_env.globals.update(
    demand_text=demand_text,
    percent=percent,
    number=number,
    box={
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": RIGHT,
        "top": TOP,
        "bottom": BOTTOM,
    },
)


def render(
    request: Request, name: str, status_code: int = 200, user: User | None = None, **context: Any
) -> HTMLResponse:
    """A page, with headers that keep it out of caches and frames and allow only its own
    inline script (the nonce) to run."""
    nonce = secrets.token_urlsafe(16)
    html = _env.get_template(name).render(request=request, user=user, nonce=nonce, **context)
    response = HTMLResponse(html, status_code)
    response.headers.update(
        {
            "Content-Security-Policy": (
                f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
                "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; "
                "base-uri 'none'"
            ),
            "Cache-Control": "no-store",
            "Referrer-Policy": "same-origin",
            "X-Content-Type-Options": "nosniff",
        }
    )
    return response


def _user(request: Request) -> User | None:
    try:
        return current_user(request)
    except HTTPException:
        return None


def _to_login(request: Request) -> RedirectResponse:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    target = "/login" if here == "/" else f"/login?next={quote(here, safe='')}"
    return RedirectResponse(target, status.HTTP_303_SEE_OTHER)


def _store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


def _job_context(request: Request, user: User, job_id: str) -> dict[str, Any] | None:
    """What the job page and its live panel show; None for a job `user` may not see."""
    store = _store(request)
    try:
        job = visible_job(store, user, job_id)
    except HTTPException:
        return None
    events = store.events(job.id)
    return {
        "job": job,
        "active": not job.final,
        "events": events,
        "attempts": attempts_of(events),
        "panels": chart(store.metrics(job.id)),
        "checkpoint": newest_checkpoint(request.app.state.job_folder, job),
        "tracking": tracking_url(request.app.state.job_folder, job),
        "log": store.tail(job.id, LOG_TAIL),
    }


# -- routes ---------------------------------------------------------------------------


def ui_router() -> APIRouter:
    """The pages: ``/login``, ``/logout``, ``/`` (jobs), ``/jobs/{id}``, ``/cluster``."""
    ui = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)

    @ui.get("/login")
    def login_form(
        request: Request, target: Annotated[str, Query(alias="next", max_length=2000)] = "/"
    ) -> Response:
        return render(request, "login.html", next=local_path(target), error=None)

    @ui.post("/login")
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode(errors="replace"), max_num_fields=4)
        token = (form.get("token") or [""])[0].strip()
        target = local_path((form.get("next") or ["/"])[0])
        user = _store(request).user_by_token(token) if 0 < len(token) <= 200 else None
        if user is None:
            error = "That token is not valid. Ask an admin for yours."
            return render(request, "login.html", 401, next=target, error=error)
        response = RedirectResponse(target, status.HTTP_303_SEE_OTHER)
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            max_age=7 * 24 * 3600,
        )
        return response

    @ui.api_route("/logout", methods=["GET", "POST"])
    def logout() -> Response:
        response = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
        response.delete_cookie(COOKIE, httponly=True, samesite="strict")
        return response

    @ui.get("/")
    def jobs(
        request: Request,
        state: Annotated[str, Query(max_length=16)] = "",
        owner: Annotated[str, Query(alias="user", max_length=64)] = "",
        team: Annotated[str, Query(max_length=64)] = "",
    ) -> Response:
        user = _user(request)
        if user is None:
            return _to_login(request)
        store = _store(request)
        states = list(ACTIVE) if state == "active" else [state] if state in STATES else None
        scope = (team or None) if user.admin else user.team
        found = store.jobs(team=scope, states=states, user=owner or None, limit=JOBS_SHOWN)
        people = [u.name for u in store.users() if user.admin or u.team == user.team]
        return render(
            request,
            "jobs.html",
            user=user,
            jobs=found,
            states=STATES,
            people=people,
            teams=store.teams() if user.admin else [user.team],
            chosen={"state": state, "user": owner, "team": team},
            now=time.time(),
        )

    @ui.get("/jobs/{job_id}")
    def job(job_id: str, request: Request) -> Response:
        user = _user(request)
        if user is None:
            return _to_login(request)
        context = _job_context(request, user, job_id)
        if context is None:
            return render(request, "404.html", 404, user=user, job_id=job_id)
        spec = yaml.safe_dump(context["job"].spec, sort_keys=False, allow_unicode=True)
        return render(request, "job.html", user=user, spec=spec, final=FINAL, **context)

    @ui.get("/jobs/{job_id}/live")
    def job_live(job_id: str, request: Request) -> Response:
        """The part of a job's page that changes, for its script to swap in."""
        user = _user(request)
        if user is None:
            return Response(status_code=status.HTTP_401_UNAUTHORIZED)
        context = _job_context(request, user, job_id)
        if context is None:
            return Response(status_code=status.HTTP_404_NOT_FOUND)
        return render(request, "_job_live.html", user=user, **context)

    @ui.get("/cluster")
    def cluster(request: Request) -> Response:
        user = _user(request)
        if user is None:
            return _to_login(request)
        app = request.app
        view = cluster_view(_store(request), app.state.pool, app.state.policy, user)
        # set by `corral server` in one-user mode (`corral.service.isolation`)
        warning = getattr(app.state, "isolation_warning", None)
        return render(request, "cluster.html", user=user, view=view, warning=warning)

    return ui
