"""Claim: corral's strategies cost no more per step than hand-written PyTorch DDP.

Measures the mean training-step time of ``corral.Trainer`` with ``AllReduce()``,
``AllReduce(compression="fp16")`` and ``Averaging(every=16)`` against a hand-written
``DistributedDataParallel`` loop (gloo, launched with ``torch.multiprocessing.spawn`` on its
own port), with the same MLP, synthetic data, batch size, worker count, threads per worker
and seed, in the same run. Both sides run whole epochs: shuffle, take this rank's slice,
fancy-index each batch, forward, loss, backward, optimizer step, ``loss.item()``; the first
epoch is warm-up. corral's step time comes from its per-epoch ``time_s`` history.
ratio = ddp_ms / corral_ms (>= 0.95 is the target; above 1 means corral is faster).

Run: ``.venv/bin/python bench/allreduce.py`` (``--help`` for sizes and repeats).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import corral


def make_model(inputs: int, hidden: int, depth: int, classes: int) -> torch.nn.Module:
    """An MLP: `depth` hidden layers of width `hidden`."""
    layers: list[torch.nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes))


def make_data(n: int, inputs: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, inputs), dtype=np.float32), rng.integers(0, classes, n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, args: argparse.Namespace, x: np.ndarray, y: np.ndarray, out: str) -> None:
    """The hand-written baseline: one epoch loop per rank, timed on rank 0."""
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    torch.manual_seed(0)
    model = DistributedDataParallel(make_model(x.shape[1], args.hidden, args.depth, args.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    n, world = len(x), args.workers
    steps = math.ceil(math.ceil(n / world) / args.batch_size)
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    hi = lo + base + (rank < extra)
    times = []
    for epoch in range(args.epochs):
        start = time.monotonic()
        order = np.random.default_rng((0, epoch)).permutation(n)[lo:hi]
        total = torch.zeros(2, dtype=torch.float64)
        for idx in np.array_split(order, steps):
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += torch.tensor([loss.item() * len(yb), len(yb)], dtype=torch.float64)
        times.append(time.monotonic() - start)
        dist.all_reduce(total)  # the epoch's mean loss, as any training loop logs
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "steps": steps}))
    dist.destroy_process_group()


def run_ddp(args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Mean step time (ms) of each epoch of the hand-written DDP loop but the first."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/ddp.json"
        mp.spawn(ddp_worker, args=(args, x, y, out), nprocs=args.workers, join=True)
        res = json.loads(Path(out).read_text())
    return [1000 * t / res["steps"] for t in res["times"][1:]]


def run_corral(
    args: argparse.Namespace, strategy: corral.Strategy, x: np.ndarray, y: np.ndarray
) -> list[float]:
    """Mean step time (ms) of each epoch of corral.Trainer but the first, from its history."""
    dims = (x.shape[1], args.hidden, args.depth, args.classes)
    with tempfile.TemporaryDirectory() as tmp:
        result = corral.Trainer(
            model=lambda: make_model(*dims),
            loss=torch.nn.CrossEntropyLoss(),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
            strategy=strategy,
            workers=args.workers,
            cpus_per_worker=args.threads,
            epochs=args.epochs,
            batch_size=args.batch_size,
            checkpoint_every=args.epochs,
            checkpoint_dir=tmp,
        ).fit((x, y))
    steps = math.ceil(math.ceil(len(x) / args.workers) / args.batch_size)
    return [1000 * row["time_s"] / steps for row in result.history[1:]]


def fmt(values: list[float]) -> str:
    return "ms/step per epoch: " + ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--depth", type=int, default=2, help="hidden layers")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5, help="the first is warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="median over repeats")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first is warm-up)")
    logging.basicConfig(level=logging.WARNING)
    x, y = make_data(args.samples, args.inputs, args.classes)
    params = sum(
        p.numel()
        for p in make_model(args.inputs, args.hidden, args.depth, args.classes).parameters()
    )
    steps = math.ceil(math.ceil(args.samples / args.workers) / args.batch_size)
    strategies = {
        "AllReduce()": corral.AllReduce,
        'AllReduce(compression="fp16")': lambda: corral.AllReduce(compression="fp16"),
        "Averaging(every=16)": lambda: corral.Averaging(every=16),
    }
    ddp: list[float] = []
    ours: dict[str, list[float]] = {name: [] for name in strategies}
    for rep in range(args.repeats):  # interleaved, so drift in machine load hits both sides
        ddp += run_ddp(args, x, y)
        print(f"repeat {rep + 1}: hand-written DDP {fmt(ddp[-args.epochs + 1 :])}", file=sys.stderr)
        for name, make in strategies.items():
            ours[name] += run_corral(args, make(), x, y)
            print(
                f"repeat {rep + 1}: corral {name} {fmt(ours[name][-args.epochs + 1 :])}",
                file=sys.stderr,
            )
    theirs = statistics.median(ddp)
    print(
        f"\nStep time, corral.Trainer vs hand-written DDP (gloo): MLP {params / 1e6:.2f} M params, "
        f"{args.workers} workers x {args.threads} thread(s), batch {args.batch_size}/worker, "
        f"{steps} steps/epoch; median over {args.repeats} runs x {args.epochs - 1} timed epochs; "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {platform.machine()}\n"
    )
    print("| corral strategy | corral ms/step | DDP ms/step | ratio (DDP / corral) |")
    print("|---|---:|---:|---:|")
    for name, values in ours.items():
        mine = statistics.median(values)
        print(f"| {name} | {mine:.2f} | {theirs:.2f} | {theirs / mine:.2f} |")
    print("\n(fp16 and Averaging rows compare against the same uncompressed DDP baseline.)")


if __name__ == "__main__":
    main()
