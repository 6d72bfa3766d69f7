"""What ``corral train`` draws: the bar before and between reports, and the summary table,
rendered by rich into 80 columns as a terminal of that width shows them."""

from __future__ import annotations

import io

from rich.console import Console

from corral.comm.control import Message
from corral.train.progress import RichProgress


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=80, force_terminal=False), out


def report(**metrics: float | str) -> Message:
    return Message("worker", 0, {"kind": "report", "metrics": metrics})


def test_before_any_report_it_says_the_workers_are_starting():
    screen, out = console()
    with RichProgress(screen, workers=2, steps=22):
        pass  # no worker reported yet: the bar's last frame is what a user saw all along
    line = out.getvalue()
    assert line.startswith("starting 2 workers…") and "importing torch, then meeting" in line


def test_an_epoch_without_progress_ticks_shows_its_steps():
    screen, out = console()
    with RichProgress(screen, workers=2, steps=22) as progress:
        # a short epoch ends before its first progress report
        progress(report(kind="epoch", epoch=1.0, epochs=1, loss=0.5, samples_per_s=900.0))
    last = out.getvalue().splitlines()[-1]
    assert "epoch 1/1" in last and "step 22/22" in last and "done" not in last


def test_the_summary_has_every_column_in_80_columns():
    screen, out = console()
    row = {
        "epoch": 12.0,
        "loss": 0.01234,
        "accuracy": 0.9876,
        "val_loss": 0.04567,
        "val_accuracy": 0.9712,
        "samples": 60000.0,
        "samples_per_s": 123456.0,
        "syncs": 1875.0,
        "time_s": 123.456,
        "workers": 16.0,
        "staleness_mean": 0.5,  # a strategy's own metric: in the epoch lines, not here
    }
    screen.print(RichProgress(screen).summary([row]))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in out.getvalue()
    header = " ".join(lines[1:3])  # a header may wrap at its space
    for name in ("loss", "accuracy", "samples", "samples/s", "syncs", "workers", "val"):
        assert name in header
    assert lines[-1].split() == [
        "12", "0.01234", "0.9876", "0.04567", "0.9712", "60000", "123456", "1875", "123.46", "16"
    ]  # fmt: skip
