"""Claim: corral reaches single-process accuracy on digits, and what its wall time costs.

Trains examples/digits.py's MLP on scikit-learn's bundled digits (nothing downloaded) with
each strategy of the example and worker count (1, 2, 4), reusing that
example's ``train``/``make_model``/``load_data`` (imported from the examples folder), and
in the same run trains the same model with plain PyTorch in one process (same optimizer,
learning rate, batch size, epochs and seed): "the limit" one process reaches. Wall time of
corral rows includes starting the workers, per-epoch validation and checkpoints; the plain
row is the training loop alone, warm (fastest of ``--plain-repeats`` runs). The training
column is the part of a corral row's wall time its workers spent in training steps (the
sum of the epochs' ``time_s``), comparable to the plain row.
ratio = corral wall / plain-torch wall (lower is better).

Run: ``.venv/bin/python bench/digits.py`` (``--epochs``, ``--workers 1 2 4``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from corral.entrypoints import load_file_module

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits.py"
LABELS = {
    "allreduce": "AllReduce()",
    "averaging": "Averaging(every=16)",
    "gossip": "Gossip(peers=1)",
    "ps-sync": "ParameterServer(mode='sync')",
    "ps-async": "ParameterServer(mode='async', lr_scaling='staleness')",
}


def load_example() -> ModuleType:
    return load_file_module(EXAMPLE)


def plain_torch(example: ModuleType, epochs: int, threads: int) -> dict[str, float]:
    """The reference: the example's model and optimizer, one process, no corral."""
    torch.set_num_threads(threads)
    x_train, x_test, y_train, y_test = example.load_data()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = example.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng((0, epoch)).permutation(len(x)))
        for idx in order.split(32):
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    wall = time.perf_counter() - start
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    return {"accuracy": float((predicted == y_test).mean()), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the plain run (a corral worker gets 1 CPU by default)",
    )
    parser.add_argument("--plain-repeats", type=int, default=2, help="fastest one is kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    example = load_example()

    # The first run in a process pays one-time costs (about 1 s here); keep the fastest.
    runs = [plain_torch(example, args.epochs, args.threads) for _ in range(args.plain_repeats)]
    limit = min(runs, key=lambda r: r["wall_s"])
    print(f"plain torch: {limit['accuracy']:.2%} in {limit['wall_s']:.1f} s", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in sorted(example.STRATEGIES):
            for workers in args.workers:
                r = example.train(strategy, workers, args.epochs, tmp)
                print(f"{strategy} x{workers}: {r['accuracy']:.2%}", file=sys.stderr)
                rows.append(r)

    print(
        f"\nDigits (sklearn, 1347 train / 450 test), MLP 64-128-10, SGD lr 0.05 momentum 0.9, "
        f"batch 32/worker, {args.epochs} epochs; {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {platform.machine()}\n"
    )
    print(
        "| strategy | workers | test accuracy | wall s | training s | ratio (wall / plain torch) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| plain PyTorch, one process (the limit) | 1 | {limit['accuracy']:.2%} "
        f"| {limit['wall_s']:.1f} | {limit['wall_s']:.1f} | 1.00 |"
    )
    for r in rows:
        print(
            f"| corral {LABELS.get(r['strategy'], r['strategy'])} | {r['workers']} "
            f"| {r['accuracy']:.2%} | {r['wall_s']:.1f} | {r['train_s']:.1f} "
            f"| {r['wall_s'] / limit['wall_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
