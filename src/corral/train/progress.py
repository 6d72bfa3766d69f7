"""Showing what workers report: log lines for the Python API, a live bar for the CLI.

Both consume the same `Message`s from the control channel, so the CLI and the Python API
always show the same numbers.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

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


class RichProgress:
    """A live progress bar (epoch, step, loss, samples/s) and a summary table at the end.

    Use as a context manager and pass the instance as ``on_report``.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.history: list[dict[str, Any]] = []
        self._progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            TextColumn("step {task.fields[step]}"),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self._task = self._progress.add_task("train", total=None, epoch="-", step="-", stats="")

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
            self._progress.update(
                self._task,
                completed=metrics["step"],
                total=metrics["steps"],
                epoch=f"{metrics['epoch']}/{metrics['epochs']}",
                step=f"{metrics['step']}/{metrics['steps']}",
                stats=f"loss {metrics['loss']:.4f}  {metrics['samples_per_s']:.0f} samples/s",
            )
        elif kind == "epoch":
            self.history.append(metrics)
            done = self._progress.tasks[0].total or 1
            self._progress.update(
                self._task,
                completed=done,
                step="done",
                epoch=f"{metrics['epoch']:.0f}/{metrics['epochs']}",
                stats=format_metrics({k: metrics[k] for k in ("loss", "samples_per_s")}),
            )
            self._progress.console.print(
                f"epoch {metrics['epoch']:.0f}/{metrics['epochs']}  {format_metrics(metrics)}"
            )
        else:
            self._progress.console.print(f"{msg.role} {msg.rank}: {format_metrics(metrics)}")

    def summary(self, history: list[dict[str, Any]]) -> Table:
        """A table with one row per epoch."""
        keys = [k for k in _ORDER if any(k in row for row in history)]
        table = Table(title="corral: training summary")
        table.add_column("epoch", justify="right")
        for key in keys:
            table.add_column(key, justify="right")
        for row in history:
            cells = [f"{row['epoch']:.0f}"]
            for key in keys:
                value = row.get(key)
                cells.append("" if value is None else format_metrics({key: value}).split("=")[1])
            table.add_row(*cells)
        return table
