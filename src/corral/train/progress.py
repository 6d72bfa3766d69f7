"""Showing what workers report: log lines for the Python API, a live bar for the CLI.

Both consume the same `Message`s from the control channel, so the CLI and the Python API
always show the same numbers.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from corral.comm.control import Message

log = logging.getLogger("corral")

_ORDER = ("loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s", "syncs", "time_s")


def format_metrics(metrics: dict[str, Any]) -> str:
    """``loss=0.1234 accuracy=0.9712 …`` in a stable order, numbers rounded for reading."""
    keys = [k for k in _ORDER if k in metrics] + sorted(
        k for k in metrics if k not in _ORDER and k not in ("kind", "epoch", "epochs")
    )
    parts = []
    for key in keys:
        value = metrics[key]
        if isinstance(value, float):
            value = f"{value:.0f}" if key in ("samples_per_s", "syncs") else f"{value:.4g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def log_report(msg: Message) -> None:
    """The Python API's default: epoch summaries at INFO, progress ticks at DEBUG."""
    metrics = msg.body["metrics"] if msg.body else {}
    kind = metrics.get("kind")
    if kind == "restart":
        return  # the launcher has warned, with the whole story
    if kind == "epoch":
        log.info("epoch %d/%d %s", metrics["epoch"], metrics["epochs"], format_metrics(metrics))
    elif kind == "progress":
        log.debug(
            "epoch %d step %d/%d %s",
            metrics["epoch"],
            metrics["step"],
            metrics["steps"],
            format_metrics(metrics),
        )
    else:
        log.info("%s %d: %s", msg.role, msg.rank, format_metrics(metrics))


def _stats(metrics: dict[str, Any], step: int | None, steps: int | None) -> str:
    """What the bar says beside it: the step (once known), loss and throughput."""
    done = f"step {step}/{steps}  " if steps else ""
    return f"{done}loss {metrics['loss']:.4f}  {metrics['samples_per_s']:.0f} samples/s"


#: The summary table's columns: history key, header, and how its numbers are written, so
#: that all of them fit 80 columns (a header wraps at its space where it must).
_TABLE: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", ".4g"),
    ("accuracy", "accuracy", ".4f"),
    ("val_loss", "val loss", ".4g"),
    ("val_accuracy", "val accuracy", ".4f"),
    ("samples", "samples", ".0f"),
    ("samples_per_s", "samples/s", ".0f"),
    ("syncs", "syncs", ".0f"),
    ("time_s", "time s", ".2f"),
    ("workers", "workers", ".0f"),
)


class RichProgress:
    """A live progress bar (epoch, step, loss, samples/s) and a summary table at the end.

    Use as a context manager and pass the instance as ``on_report``. Until the first
    report it says that the workers are starting: each starts Python and imports torch,
    then they meet, which takes seconds (tens of them on a loaded machine) and would
    otherwise look like a hang.

    Args:
        console: Where to draw; standard error by default.
        workers: How many workers the job starts, for the line shown until they report.
        steps: Steps per epoch, shown once an epoch is done even if it ended before its
            first progress report (short epochs send none).
    """

    def __init__(
        self, console: Console | None = None, *, workers: int = 1, steps: int | None = None
    ) -> None:
        self.console = console or Console(stderr=True)
        self.history: list[dict[str, Any]] = []
        self._steps = steps
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        noun = "worker" if workers == 1 else "workers"
        self._task = self._progress.add_task(
            f"starting {workers} {noun}…",
            total=None,
            stats="importing torch, then meeting",
        )

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def __call__(self, msg: Message) -> None:
        metrics = msg.body["metrics"] if msg.body else {}
        kind = metrics.get("kind")
        if kind == "progress":
            self._steps = metrics["steps"]
            self._progress.update(
                self._task,
                completed=metrics["step"],
                total=metrics["steps"],
                description=f"epoch {metrics['epoch']}/{metrics['epochs']}",
                stats=_stats(metrics, metrics["step"], metrics["steps"]),
            )
        elif kind == "epoch":
            self.history.append(metrics)
            steps = self._steps or 1
            self._progress.update(
                self._task,
                completed=steps,
                total=steps,
                description=f"epoch {metrics['epoch']:.0f}/{metrics['epochs']}",
                stats=_stats(metrics, self._steps, self._steps),
            )
            self._progress.console.print(
                f"epoch {metrics['epoch']:.0f}/{metrics['epochs']}  {format_metrics(metrics)}"
            )
        else:
            self._progress.console.print(f"{msg.role} {msg.rank}: {format_metrics(metrics)}")

    def summary(self, history: list[dict[str, Any]]) -> Table:
        """A table with one row per epoch, in 80 columns: numbers rounded for reading,
        columns one space apart. A strategy's own metrics (a parameter server's
        staleness, say) are in the epoch lines above it."""
        columns = [c for c in _TABLE if any(c[0] in row for row in history)]
        table = Table(
            title="corral: training summary", box=box.SIMPLE_HEAD, show_edge=False, padding=0
        )
        table.add_column("epoch", justify="right")
        for _, header, _ in columns:
            table.add_column(header, justify="right")
        for row in history:
            cells = [f"{row['epoch']:.0f}"]
            for key, _, spec in columns:
                value = row.get(key)
                cells.append("" if value is None else format(value, spec))
            table.add_row(*cells)
        return table
