"""Train an MLP on scikit-learn's bundled digits with every strategy corral has.

Run: ``python examples/digits.py`` trains each strategy on 2 workers, and AllReduce on 4
too. Pick runs with ``--strategy gossip --workers 4`` (both repeatable). The data ships
with scikit-learn, so nothing is downloaded. Prints one line per run and a table of test
accuracy and wall time at the end.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import corral

#: the servers' optimizer, the same as the workers' one for the other strategies
SERVER_SGD = {"lr": 0.05, "momentum": 0.9}
STRATEGIES: dict[str, Callable[[], corral.Strategy]] = {
    "allreduce": lambda: corral.AllReduce(),
    "averaging": lambda: corral.Averaging(every=16),
    "gossip": lambda: corral.Gossip(peers=1),
    "ps-sync": lambda: corral.ParameterServer(mode="sync", optimizer_args=SERVER_SGD),
    # async applies every gradient as it comes: dividing its rate by the gradient's
    # staleness keeps it as stable as sync (Zhang et al., IJCAI 2016)
    "ps-async": lambda: corral.ParameterServer(
        mode="async", lr_scaling="staleness", optimizer_args=SERVER_SGD
    ),
}
#: what the demo runs: every strategy on 2 workers, and AllReduce on 4 as well
DEMO_RUNS = [(name, 2) for name in STRATEGIES] + [("allreduce", 4)]


def make_model() -> torch.nn.Module:
    """A two-layer MLP for 8×8 images."""
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits, scaled to [0, 1], split 75/25 stratified with random_state=0."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=0
    )
    return x_train, x_test, y_train, y_test


def train(strategy: str, workers: int, epochs: int, checkpoint_dir: str | None) -> dict:
    """Train once and return test accuracy, wall time and the part of it spent training."""
    x_train, x_test, y_train, y_test = load_data()
    trainer = corral.Trainer(
        model=make_model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        strategy=STRATEGIES[strategy](),
        workers=workers,
        epochs=epochs,
        batch_size=32,
        checkpoint_dir=checkpoint_dir and f"{checkpoint_dir}/{strategy}-{workers}",
    )
    start = time.perf_counter()
    result = trainer.fit((x_train, y_train), validation=(x_test, y_test))
    wall = time.perf_counter() - start
    with torch.no_grad():
        predicted = result.model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    accuracy = float((predicted == y_test).mean())
    return {
        "strategy": strategy,
        "workers": workers,
        "accuracy": accuracy,
        "wall_s": wall,
        "train_s": sum(row["time_s"] for row in result.history),
        "samples_per_s": result.metrics["samples_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", choices=list(STRATEGIES), action="append")
    parser.add_argument("--workers", type=int, action="append")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--checkpoint-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    runs = DEMO_RUNS
    if args.strategy or args.workers:
        runs = [(s, w) for s in args.strategy or STRATEGIES for w in args.workers or [2]]
    rows = []
    for strategy, workers in runs:
        row = train(strategy, workers, args.epochs, args.checkpoint_dir)
        print(
            f"{strategy:<10} workers={workers}  test accuracy {row['accuracy']:.2%}"
            f"  ({row['wall_s']:.1f} s)",
            flush=True,
        )
        rows.append(row)
    print("\n| strategy | workers | test accuracy | wall s | training s | train samples/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['workers']} | {r['accuracy']:.2%} | {r['wall_s']:.1f} "
            f"| {r['train_s']:.1f} | {r['samples_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
