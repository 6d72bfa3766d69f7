"""Claim: a sparse embedding table on the parameter server moves only the rows a step touches.

Trains the same bag-of-tokens model — ``EmbeddingBag(--vocab, --dim, mode="mean")`` and a
linear layer — with ``corral.ParameterServer(mode="async", servers=2)`` on 2 workers, once
with ``sparse=True`` (touched rows pushed, rows pulled before each forward) and once with
``sparse=False`` (the whole table pushed and pulled every step, as a dense parameter
server such as Elephas does), in the same run. Both train ``--epochs`` epochs of
``--samples`` bags of ``--tokens`` ids, ``--batch`` per worker.

Prints bytes moved through the servers per step (from the servers' own counters, both
directions; the table's transfers at start-up and at each epoch's end included) and wall
time per step, and the ratio dense / sparse for each; for the sparse run also the bytes
per step without the whole-table transfers at start-up and epoch ends. The floor for the
sparse run is the rows touched: at most ``batch × tokens`` rows of ``dim`` floats per direction
per worker step, printed too.

Run: ``.venv/bin/python bench/ps_sparse.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

import corral


def make_model(vocab: int, dim: int, sparse: bool) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.EmbeddingBag(vocab, dim, mode="mean", sparse=sparse), torch.nn.Linear(dim, 2)
    )


def run(args: argparse.Namespace, sparse: bool, tmp: str) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, args.vocab, size=(args.samples, args.tokens))
    y = (x[:, 0] % 2).astype(np.int64)

    def model() -> torch.nn.Module:
        return make_model(args.vocab, args.dim, sparse)

    trainer = corral.Trainer(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        strategy=corral.ParameterServer(mode="async", servers=2, optimizer_args={"lr": 0.5}),
        workers=2,
        epochs=args.epochs,
        batch_size=args.batch,
        checkpoint_dir=os.path.join(tmp, "sparse" if sparse else "dense"),
    )
    start = time.monotonic()
    result = trainer.fit((x, y), on_report=None)
    wall = time.monotonic() - start
    steps = sum(r["syncs"] for r in result.history) * 2  # syncs are per worker
    train_s = sum(r["time_s"] for r in result.history)
    # whole-table transfers: each worker offers the table and gets it back at start-up,
    # and pulls it at every epoch's end
    table_bytes = args.vocab * args.dim * 4 * 2 * (2 + args.epochs) if sparse else 0
    return {
        "bytes_per_step": result.metrics["server_bytes"] / steps,
        "steady_bytes_per_step": (result.metrics["server_bytes"] - table_bytes) / steps,
        "ms_per_step": 1000 * train_s * 2 / steps,  # two workers step side by side
        "wall_s": wall,
        "loss": result.metrics["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        sparse = run(args, True, tmp)
        dense = run(args, False, tmp)
    table_mb = args.vocab * args.dim * 4 / 1e6
    floor = 2 * args.batch * args.tokens * args.dim * 4  # rows out and back, one worker step
    print(
        f"\n{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}; table {args.vocab}×{args.dim} ({table_mb:.0f} MB), "
        f"{args.samples} bags of {args.tokens} ids, batch {args.batch}, {args.epochs} epochs\n"
    )
    print("| table | bytes per step | ms per step | final loss | total wall s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("sparse=True (rows)", sparse), ("sparse=False (whole table)", dense)):
        print(
            f"| {name} | {r['bytes_per_step'] / 1e6:.3f} MB | {r['ms_per_step']:.1f} | "
            f"{r['loss']:.4f} | {r['wall_s']:.1f} |"
        )
    print(
        f"| sparse=True, without the start-up and epoch-end table transfers | "
        f"{sparse['steady_bytes_per_step'] / 1e6:.3f} MB | | | |"
    )
    print(f"| floor: touched rows only | ≤ {floor / 1e6:.3f} MB | | | |")
    print(
        f"\ndense / sparse: {dense['bytes_per_step'] / sparse['bytes_per_step']:.1f}× the bytes, "
        f"{dense['ms_per_step'] / sparse['ms_per_step']:.1f}× the time per step"
    )


if __name__ == "__main__":
    main()
