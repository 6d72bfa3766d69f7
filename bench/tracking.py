"""Claim: tracking a job in MLflow costs under 2% of its step time, per-step metrics on.

The same 2-worker AllReduce fit (an MLP on synthetic data, many small steps, so that any
per-step cost would show) runs with ``tracking=None`` and with
``tracking=corral.MLflow(step_metrics=True)`` on a local SQLite MLflow store, alternating,
``--repeats`` times each. The measure is the training time the workers themselves report:
each epoch's ``time_s`` summed over the epochs after the first (start-up and MLflow's run
creation are not step time; they are shown apart, as the whole fit's wall time). The
tracker runs on the driver and logs in batches from a thread of its own, so the workers'
steps should not see it; the driver shares the machine's cores, which is what this
measures.

Run: ``.venv/bin/python bench/tracking.py`` (``--repeats N``, ``--epochs N``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import corral


def fit(tracking: corral.MLflow | None, epochs: int, folder: Path) -> tuple[float, float, int]:
    """Training seconds (epochs after the first), wall seconds, and steps per epoch."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8192, 32)).astype(np.float32)
    y = (x[:, :4].sum(1) > 0).astype(np.int64)
    trainer = corral.Trainer(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)
        ),
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        workers=2,
        epochs=epochs,
        batch_size=32,
        checkpoint_dir=folder / "checkpoints",
        tracking=tracking,
    )
    start = time.perf_counter()
    result = trainer.fit((x, y), on_report=None)
    wall = time.perf_counter() - start
    steps = 8192 // 2 // 32
    return sum(r["time_s"] for r in result.history[1:]), wall, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    steps = 0
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for i in range(args.repeats):
            for name in ("off", "on"):
                tracking = corral.MLflow(uri=store, step_metrics=True) if name == "on" else None
                folder = Path(tmp, f"{name}-{i}")
                train, wall, steps = fit(tracking, args.epochs, folder)
                rows[name].append((train, wall))
                print(f"{name} repeat {i + 1}: train {train:.2f} s, wall {wall:.2f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    timed = args.epochs - 1
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.repeats} repeats, {timed} timed epochs of {steps} steps a worker\n")  # fmt: skip
    print("| tracking | step time (median) | training s (median) | fit wall s (median) |")
    print("|---|---|---|---|")
    medians = {}
    for name, values in rows.items():
        train = statistics.median(t for t, _ in values)
        wall = statistics.median(w for _, w in values)
        medians[name] = train
        step_ms = 1000 * train / (timed * steps)
        label = "none" if name == "off" else "MLflow, per-step metrics"
        print(f"| {label} | {step_ms:.3f} ms | {train:.2f} | {wall:.2f} |")
    overhead = 100 * (medians["on"] / medians["off"] - 1)
    print(f"\nstep-time overhead of tracking: {overhead:+.1f}% (claim: under 2%)")


if __name__ == "__main__":
    main()
