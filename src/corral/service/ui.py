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

The search pages (``/searches``, ``/searches/{id}``) read `search_detail`, as GET
/api/searches/{id} does, and scope by `visible_search`: another team's search is the 404
of none. A search's page draws its metric per epoch (a line per trial), its parameters'
importance, and parallel coordinates (an axis per parameter, on the space's scale: log,
linear, or by choice) from the study's trials; a running search's page swaps in its
server-drawn part from ``/searches/{id}/live`` every 2 s, as a job's does, and stops
once the search has ended. ``/searches/{id}/best.yaml`` is the best trial's job, a file
for ``corral train``.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, quote

import jinja2
import yaml
from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from corral.search.driver import best_trial
from corral.service.auth import COOKIE, current_user
from corral.service.models import SearchDetail, TrialOut
from corral.service.resources import number
from corral.service.search_api import visible_search
from corral.service.searches import Search, SearchStore, best_spec, search_detail
from corral.service.store import FINAL, STATES, Event, Store, User
from corral.service.views import (
    ACTIVE,
    cluster_view,
    join_address,
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
    (when the job validates), and throughput (samples/s over all workers); for a
    federated job, its rounds' clients (those that reported) and the privacy spent."""
    panels = [
        panel(rows, "loss", "loss", log=True),
        panel(rows, "val_accuracy", "validation accuracy", bounds=(0.0, 1.0)),
        panel(rows, "samples_per_s", "samples/s", from_zero=True),
        panel(rows, "clients_reported", "clients per round", from_zero=True),
        panel(rows, "epsilon", "privacy spent (ε)", from_zero=True),
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


# -- the search pages' pictures: pure helpers -------------------------------------------

#: The epoch chart's size and margins (SVG user units): room on the left for the values,
#: below for the epochs and the axis title.
EPOCH_W, EPOCH_H, EPOCH_LEFT, EPOCH_RIGHT, EPOCH_TOP, EPOCH_BOTTOM = 640, 280, 62, 16, 14, 40
#: Parallel coordinates: the height, the gap between two axes, the margins (labels over
#: the axes, tick values to the left of each).
PC_H, PC_GAP, PC_SIDE, PC_TOP, PC_BOTTOM = 320, 190, 64, 40, 18
#: Importance bars: one row each, the labels' column capped so a long path cannot push
#: the bars off the picture.
BAR_W, BAR_ROW, BAR_LABEL_MAX = 560, 26, 240
#: The colour of a trial's value from worse to better (viridis, its palest yellow cut
#: off: a pale line on the white page would not be seen).
RAMP = ((181, 222, 43), (94, 201, 98), (33, 145, 140), (59, 82, 139), (68, 1, 84))


def _choice_key(value: Any) -> str:
    """A choice as one comparable key: the space's choices come back from JSON and a
    trial's from Optuna, so ``32`` and ``32``, ``[1, 2]`` and ``(1, 2)`` must meet, and
    ``True`` must not meet ``1`` as it would under ``==``."""
    return json.dumps(value, sort_keys=True, default=str)


def _choice_label(value: Any) -> str:
    return value if isinstance(value, str) else _choice_key(value)


def nice_ticks(lo: float, hi: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """About `count` round values (steps of 1, 2, 2.5 or 5 times a power of ten) between
    `lo` and `hi`, so an axis reads 0.2, 0.4, 0.6 rather than 0.213, 0.427; whole numbers
    only with `integer` (an int parameter has no value 2.5)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        return []
    if hi - lo < 1e-12:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, math.ceil(step))
    first = math.ceil(lo / step - 1e-9) * step
    found = []
    k = 0
    while first + k * step <= hi + step * 1e-9:
        value = round(first + k * step, 12)
        found.append(float(round(value)) if integer else value)
        k += 1
    return found


@dataclass(frozen=True)
class Axis:
    """One direction of a chart: `lo` drawn at pixel `start`, `hi` at `end` (on a log
    axis `lo` and `hi` are log10 of the values; on a categorical one, the first and last
    choice's index). A flat range (a single value or choice) is drawn midway instead of
    dividing by zero."""

    kind: Literal["linear", "log", "categorical"]
    lo: float
    hi: float
    start: float
    end: float
    integer: bool = False
    choices: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()

    def _place(self, u: float) -> float:
        if self.hi - self.lo < 1e-12:
            return round((self.start + self.end) / 2, 1)
        return round(self.start + (self.end - self.start) * (u - self.lo) / (self.hi - self.lo), 1)

    def at(self, value: Any) -> float | None:
        """The pixel of `value`; None for one this axis cannot show (a choice it does not
        list, a value that is not a finite number, one at or below 0 on a log axis)."""
        if self.kind == "categorical":
            key = _choice_key(value)
            return self._place(self.choices.index(key)) if key in self.choices else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isfinite(value) or (self.kind == "log" and value <= 0):
            return None
        return self._place(math.log10(value) if self.kind == "log" else float(value))

    def ticks(self) -> list[tuple[float, str]]:
        """Labelled positions: every choice; the powers of ten on a log axis (its ends if
        it spans less than two); round values on a linear one."""
        if self.kind == "categorical":
            return [(self._place(i), text) for i, text in enumerate(self.labels)]
        if self.kind == "log":
            eps = 1e-9
            decades = list(range(math.ceil(self.lo - eps), math.floor(self.hi + eps) + 1))
            if len(decades) < 2:
                return [(self._place(u), _fmt(10**u)) for u in (self.lo, self.hi)]
            every = math.ceil(len(decades) / 6)
            return [(self._place(u), _fmt(10.0**u)) for u in decades[::every]]
        values = nice_ticks(self.lo, self.hi, integer=self.integer)
        return [(self._place(v), _fmt(v)) for v in values]


def linear_axis(lo: float, hi: float, start: float, end: float, *, integer: bool = False) -> Axis:
    """`lo` to `hi` evenly from `start` to `end`."""
    return Axis("linear", float(lo), float(hi), start, end, integer=integer)


def log_axis(lo: float, hi: float, start: float, end: float) -> Axis:
    """`lo` to `hi` (both above 0) on a log scale: each decade the same length, so a
    learning rate searched from 1e-4 to 1e-1 is not all crowded at one end."""
    if lo <= 0 or hi <= 0:
        raise ValueError(f"a log axis needs values above 0, not {lo:g} to {hi:g}")
    return Axis("log", math.log10(lo), math.log10(hi), start, end)


def categorical_axis(choices: Sequence[Any], start: float, end: float) -> Axis:
    """The choices spaced evenly from `start` to `end`, in the space's order."""
    return Axis(
        "categorical",
        0.0,
        float(max(len(choices) - 1, 0)),
        start,
        end,
        choices=tuple(_choice_key(c) for c in choices),
        labels=tuple(_choice_label(c) for c in choices),
    )


def param_axis(param: Mapping[str, Any], start: float, end: float) -> Axis:
    """A parameter's axis over its whole range in the space (not just the values tried,
    so the picture shows which part of the range the search explored): categorical by
    choice, log for a ``log`` range, linear otherwise."""
    if param.get("choices") is not None:
        return categorical_axis(param["choices"], start, end)
    lo, hi = float(param["low"]), float(param["high"])
    if param.get("log"):
        return log_axis(lo, hi, start, end)
    return linear_axis(lo, hi, start, end, integer=param.get("type") == "int")


def value_colour(fraction: float) -> str:
    """A trial's colour, `fraction` from 0 (the worst value) to 1 (the best): pale
    yellow-green to dark purple, a ramp that stays readable in grey and to most colour
    blindness."""
    f = min(1.0, max(0.0, fraction)) * (len(RAMP) - 1)
    i = min(int(f), len(RAMP) - 2)
    a, b = RAMP[i], RAMP[i + 1]
    rgb = (round(x + (y - x) * (f - i)) for x, y in zip(a, b, strict=True))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def metric_text(value: float | None) -> str:
    """A metric as the CLI's table shows it: 4 significant digits; ``nan`` for the
    infinity a NaN report is stored as (the worst value, so the sampler avoids it)."""
    if value is None:
        return "—"
    if math.isinf(value) or math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def param_text(value: Any) -> str:
    """A parameter's value, floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def param_headers(paths: Sequence[str]) -> list[str]:
    """Each parameter's last path segment (``lr`` for ``optimizer.lr``), the whole path
    where two would read the same: the same short names as the CLI's table."""
    short = [p.rsplit(".", 1)[-1] for p in paths]
    return [s if short.count(s) == 1 else p for s, p in zip(short, paths, strict=True)]


def _trial_title(trial: TrialOut, metric: str, best: int | None) -> str:
    values = ", ".join(f"{k}={param_text(v)}" for k, v in trial.params.items())
    mark = " (best)" if trial.number == best else ""
    epochs = f"{trial.epochs} epoch{'' if trial.epochs == 1 else 's'}"
    return (
        f"trial {trial.number}{mark} · {trial.state} · {metric} {metric_text(trial.value)} "
        f"after {epochs}" + (f" · {values}" if values else "")
    )


@dataclass(frozen=True)
class TrialLine:
    """One trial's metric per epoch in the epoch chart; `end` is its last point, marked
    (a cross for a pruned trial, so one stopped early reads as stopped, not as short)."""

    number: int
    state: str
    path: str
    end: tuple[float, float]
    best: bool
    title: str


@dataclass(frozen=True)
class EpochChart:
    """The metric per epoch of every trial that reported one, the best drawn last (on
    top of the others)."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    lines: list[TrialLine]


def epoch_chart(trials: Sequence[TrialOut], metric: str, best: int | None) -> EpochChart | None:
    """The epoch chart of `trials`; None before any trial reported an epoch. Values that
    are not finite (a NaN report) are left out, the line broken there."""
    finite = [v for t in trials for v in t.history if math.isfinite(v)]
    if not finite:
        return None
    epochs = max(len(t.history) for t in trials)
    x = linear_axis(1, epochs, EPOCH_LEFT, EPOCH_W - EPOCH_RIGHT, integer=True)
    lo, hi = _widen(min(finite), max(finite), 0.5 * abs(max(finite)) or 0.5)
    y = linear_axis(lo, hi, EPOCH_H - EPOCH_BOTTOM, EPOCH_TOP)
    lines = []
    for trial in sorted(trials, key=lambda t: t.number == best):
        parts, pen_up, last = [], True, None
        for epoch, value in enumerate(trial.history, start=1):
            px, py = x.at(epoch), y.at(value)
            if px is None or py is None:
                pen_up = True
                continue
            parts.append(f"{'M' if pen_up else 'L'}{px},{py}")
            pen_up, last = False, (px, py)
        if last is None:
            continue
        lines.append(
            TrialLine(
                number=trial.number,
                state=trial.state,
                path=" ".join(parts),
                end=last,
                best=trial.number == best,
                title=_trial_title(trial, metric, best),
            )
        )
    every = [(x.at(e) or 0.0, str(e)) for e in range(1, epochs + 1)]
    x_ticks = every if epochs <= 12 else x.ticks()
    return EpochChart(
        width=EPOCH_W,
        height=EPOCH_H,
        left=EPOCH_LEFT,
        right=EPOCH_RIGHT,
        top=EPOCH_TOP,
        bottom=EPOCH_BOTTOM,
        x_ticks=x_ticks,
        y_ticks=y.ticks(),
        lines=lines,
    )


@dataclass(frozen=True)
class Bar:
    """One parameter's importance: its bar's width and row, and its share as text."""

    label: str
    share: float
    y: float
    width: float
    text: str


@dataclass(frozen=True)
class ImportanceChart:
    """Horizontal bars, the most important parameter first."""

    width: int
    height: int
    left: int
    bars: list[Bar]


def importance_bars(importance: Mapping[str, float]) -> ImportanceChart | None:
    """The importances (fANOVA's shares of the metric's variance, summing to about 1)
    as bars, the longest for the largest; None when there are none yet."""
    shown = sorted(
        ((k, v) for k, v in importance.items() if math.isfinite(v) and v >= 0),
        key=lambda kv: -kv[1],
    )
    if not shown:
        return None
    left = min(BAR_LABEL_MAX, 12 + 7 * max(len(k) for k, _ in shown))
    inner = BAR_W - left - 52
    top = max(v for _, v in shown) or 1.0
    total = sum(v for _, v in shown) or 1.0
    bars = []
    for i, (label, share) in enumerate(shown):
        percent_of = 100 * share / total
        text = "<1%" if 0 < percent_of < 1 else f"{percent_of:.0f}%"
        bars.append(Bar(label, share, i * BAR_ROW + 4, round(inner * share / top, 1), text))
    return ImportanceChart(BAR_W, len(bars) * BAR_ROW + 8, left, bars)


@dataclass(frozen=True)
class ParallelAxis:
    """One vertical axis of the parallel coordinates: a parameter's, or the metric's."""

    x: float
    label: str
    title: str
    note: str
    ticks: list[tuple[float, str]]


@dataclass(frozen=True)
class ParallelLine:
    """One trial across the axes (its points as SVG ``points``), coloured by its value."""

    number: int
    state: str
    points: str
    colour: str
    best: bool
    title: str


@dataclass(frozen=True)
class ParallelChart:
    """Parallel coordinates: an axis per parameter and one for the metric; `worst` and
    `best` are the values at the colour ramp's two ends, for its legend."""

    width: int
    height: int
    top: int
    bottom: int
    axes: list[ParallelAxis]
    lines: list[ParallelLine]
    worst: str
    best: str


def parallel_coordinates(
    space: Mapping[str, Mapping[str, Any]],
    trials: Sequence[TrialOut],
    metric: str,
    mode: str,
    best: int | None,
) -> ParallelChart | None:
    """Every completed or pruned trial with a finite value as a polyline through its
    values on each parameter's axis (`param_axis`) and on the metric's, better values
    darker, the best drawn last; None when there is no such trial. A parameter a trial
    did not sample (a ``when`` condition) is skipped by its line."""
    shown = [
        t
        for t in trials
        if t.state in ("complete", "pruned") and t.value is not None and math.isfinite(t.value)
    ]
    if not shown:
        return None
    paths = list(space)
    count = len(paths) + 1
    width = max(720, 2 * PC_SIDE + PC_GAP * (count - 1))
    gap = (width - 2 * PC_SIDE) / max(count - 1, 1)
    bottom, top = PC_H - PC_BOTTOM, PC_TOP
    axes: list[tuple[float, Axis]] = []
    drawn: list[ParallelAxis] = []
    names = param_headers(paths)
    for i, (path, name) in enumerate(zip(paths, names, strict=True)):
        axis, at = param_axis(space[path], bottom, top), round(PC_SIDE + i * gap, 1)
        note = {"log": "log scale", "categorical": "by choice"}.get(axis.kind, "")
        axes.append((at, axis))
        title = f"{path}, {note}" if note else path
        drawn.append(ParallelAxis(at, name, title, note, axis.ticks()))
    values = [t.value for t in shown if t.value is not None]
    lo, hi = _widen(min(values), max(values), 0.5 * abs(max(values)) or 0.5)
    value_axis, at = linear_axis(lo, hi, bottom, top), round(PC_SIDE + (count - 1) * gap, 1)
    better = "higher" if mode == "max" else "lower"
    note = f"{better} is better"
    drawn.append(ParallelAxis(at, metric, f"{metric}, {note}", note, value_axis.ticks()))
    low, high = min(values), max(values)

    def goodness(v: float) -> float:
        if high - low < 1e-12:
            return 1.0
        f = (v - low) / (high - low)
        return f if mode == "max" else 1 - f

    lines = []
    for trial in sorted(shown, key=lambda t: (t.number == best, goodness(t.value or 0.0))):
        assert trial.value is not None
        points = []
        for (ax, axis), path in zip(axes, paths, strict=True):
            py = axis.at(trial.params[path]) if path in trial.params else None
            if py is not None:
                points.append(f"{ax},{py}")
        points.append(f"{at},{value_axis.at(trial.value)}")
        lines.append(
            ParallelLine(
                number=trial.number,
                state=trial.state,
                points=" ".join(points),
                colour=value_colour(goodness(trial.value)),
                best=trial.number == best,
                title=_trial_title(trial, metric, best),
            )
        )
    ends = (low, high) if mode == "max" else (high, low)
    return ParallelChart(
        width=round(width),
        height=PC_H,
        top=top,
        bottom=bottom,
        axes=drawn,
        lines=lines,
        worst=metric_text(ends[0]),
        best=metric_text(ends[1]),
    )


def pruner_text(settings: Mapping[str, Any]) -> str:
    """The search's pruner (or population based training) in one line."""
    pbt = settings.get("pbt")
    if pbt:
        return (
            f"population based training: {pbt['population']} at once, "
            f"exploit every {pbt['interval']} epochs"
        )
    pruner = settings.get("pruner") or {"kind": "none"}
    kind = pruner.get("kind", "none")
    if kind in ("asha", "hyperband"):
        return (
            f"{kind} · at least {pruner['min_epochs']} epoch"
            f"{'' if pruner['min_epochs'] == 1 else 's'}, reduction factor "
            f"{pruner['reduction_factor']}"
        )
    if kind == "median":
        return (
            f"median · after {pruner['warmup_epochs']} warm-up epochs and "
            f"{pruner['startup_trials']} trials"
        )
    return "none"


#: The colour ramp as a CSS gradient, for the parallel coordinates' legend.
RAMP_CSS = "linear-gradient(to right, " + ", ".join(f"rgb{c}" for c in RAMP) + ")"


def best_yaml(
    spec: Mapping[str, Any],
    *,
    search: str,
    search_id: str,
    trial: int,
    metric: str,
    value: float | None,
) -> str:
    """The best trial's job as a YAML file for ``corral train``, with a comment saying
    where it came from (a file downloaded today is read again in a month)."""
    head = (
        f"# the best trial ({trial}) of search {search} ({search_id}): "
        f"{metric} {metric_text(value)}\n# run it: corral train {search}-best.yaml\n"
    )
    return head + yaml.safe_dump(dict(spec), sort_keys=False, allow_unicode=True)


# -- rendering ------------------------------------------------------------------------

_env.filters.update(when=when, duration=duration, log_text=log_text)
_env.globals.update(
    metric_text=metric_text,
    param_text=param_text,
    ramp_css=RAMP_CSS,
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
        "join": None if job.final else join_address(request.app.state.job_folder, job),
        "log": store.tail(job.id, LOG_TAIL),
    }


#: Rows in the searches table: the newest first.
SEARCHES_SHOWN = 200


@dataclass(frozen=True)
class SearchRow:
    """A row of the searches table: the search, its trials ended, its best value."""

    search: Search
    done: int
    best: float | None


def _search_rows(searches: SearchStore, found: list[Search]) -> list[SearchRow]:
    """The table's rows, read from each study's trials alone: the whole detail would
    also compute each search's parameter importance, which this table does not show."""
    rows = []
    for search in found[:SEARCHES_SHOWN]:
        study = searches.study(search)
        done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        top = best_trial(study)
        rows.append(SearchRow(search, done, None if top is None else top.value))
    return rows


def _visible_search(request: Request, user: User, search_id: str) -> Search | None:
    """The search, if `user` may see it (`visible_search`: the API's own rule)."""
    try:
        return visible_search(SearchStore(_store(request)), user, search_id)
    except HTTPException:
        return None


def _search_context(request: Request, user: User, search_id: str) -> dict[str, Any] | None:
    """What the search page and its live part show; None for a search `user` may not see."""
    search = _visible_search(request, user, search_id)
    if search is None:
        return None
    detail: SearchDetail = search_detail(SearchStore(_store(request)), search)
    space: dict[str, Any] = detail.request["space"]
    settings: dict[str, Any] = detail.request["settings"]
    best = detail.best.number if detail.best else None
    states = [t.state for t in detail.trial_list]
    spec = None
    if detail.best is not None and detail.best_spec is not None:
        spec = best_yaml(
            detail.best_spec,
            search=detail.name,
            search_id=detail.id,
            trial=detail.best.number,
            metric=detail.metric,
            value=detail.best.value,
        )
    return {
        "search": detail,
        "active": detail.state == "running",
        "columns": list(zip(space, param_headers(list(space)), strict=True)),
        "settings": settings,
        "pruner": pruner_text(settings),
        "best": best,
        "done": sum(s in ("complete", "pruned", "fail") for s in states),
        "counts": {s: states.count(s) for s in dict.fromkeys(states)},
        "epochs": epoch_chart(detail.trial_list, detail.metric, best),
        "importance": importance_bars(detail.importance),
        "parallel": parallel_coordinates(
            space, detail.trial_list, detail.metric, detail.mode, best
        ),
        "best_yaml": spec,
    }


# -- routes ---------------------------------------------------------------------------


def ui_router() -> APIRouter:
    """The pages: ``/login``, ``/logout``, ``/`` (jobs), ``/jobs/{id}``, ``/cluster``,
    ``/searches`` and ``/searches/{id}``."""
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

    @ui.get("/searches")
    def searches_page(request: Request) -> Response:
        user = _user(request)
        if user is None:
            return _to_login(request)
        searches = SearchStore(_store(request))
        found = searches.list(team=None if user.admin else user.team)
        rows = _search_rows(searches, found)
        return render(request, "searches.html", user=user, rows=rows, total=len(found))

    @ui.get("/searches/{search_id}")
    def search_page(search_id: str, request: Request) -> Response:
        user = _user(request)
        if user is None:
            return _to_login(request)
        context = _search_context(request, user, search_id)
        if context is None:
            return render(request, "404.html", 404, user=user, search_id=search_id)
        return render(request, "search.html", user=user, **context)

    @ui.get("/searches/{search_id}/live")
    def search_live(search_id: str, request: Request) -> Response:
        """The part of a search's page that changes, for its script to swap in."""
        user = _user(request)
        if user is None:
            return Response(status_code=status.HTTP_401_UNAUTHORIZED)
        context = _search_context(request, user, search_id)
        if context is None:
            return Response(status_code=status.HTTP_404_NOT_FOUND)
        return render(request, "_search_live.html", user=user, **context)

    @ui.get("/searches/{search_id}/best.yaml")
    def search_best(search_id: str, request: Request) -> Response:
        """The best trial's job, as a file for ``corral train``; the same 404 as the
        page for a search the user may not see."""
        user = _user(request)
        if user is None:
            return _to_login(request)
        search = _visible_search(request, user, search_id)
        if search is None:
            return render(request, "404.html", 404, user=user, search_id=search_id)
        study = SearchStore(_store(request)).study(search)
        top, spec = best_trial(study), best_spec(search, study)
        if top is None or spec is None:
            return Response(
                "no trial of this search has completed yet\n", 404, media_type="text/plain"
            )
        text = best_yaml(
            spec,
            search=search.name,
            search_id=search.id,
            trial=top.number,
            metric=search.request.settings.metric,
            value=top.value,
        )
        filename = f"{search.name}-best.yaml"
        return Response(
            text,
            media_type="text/yaml",
            headers={
                "Content-Disposition": f'attachment; filename="{filename}"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    return ui
