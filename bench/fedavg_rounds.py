"""Rounds to a test accuracy on digits, label-shard non-IID: FedAvg (E=5, B=10) vs FedSGD.

The claim (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, abstract): federated averaging needs 10-100x fewer
communication rounds than synchronized SGD (FedSGD: one full-batch gradient a sampled
client a round) to reach a target accuracy, non-IID data included.

Setup: scikit-learn's digits scaled to [0, 1], split 75/25 stratified with random_state=0
(examples/digits.py's ``load_data``), its 64-128-10 MLP (``make_model``); 100 clients of
2 label-sorted shards each (``LabelShards(shards=2)``, the paper's pathological non-IID),
C = 0.1 (10 clients a round), plain SGD on the clients, server step 1, 2 workers.

* FedSGD: E = 1, B = all (``batch_size`` above any client's sample count): each sampled
  client takes one full-batch gradient step.
* FedAvg: E = 5, B = 10.

Each rule's client learning rate is picked from a small grid on one seed (the lr that
reaches the highest bar in the fewest rounds), then run on every seed. The default grids
bracket each rule's best: FedSGD diverges from lr 1.5 up (2 and 4 too), FedAvg at 1.2;
FedAvg 0.2 and 0.6 fall between the neighbours kept. Clients hold about 13.5 samples, so
E = 5, B = 10 is 10 local steps a round (2 batches an epoch), not the hundreds an MNIST
client of 600 images (60,000 over 100 clients) takes: the room for local work
to save rounds is small.

``--clients`` and ``--fraction`` test that explanation: digits has only 1,347 training
images, so more local work a round means fewer, larger clients. ``--clients 10
--fraction 1.0`` keeps 10 clients a round, each of about 135 samples (about 70 local steps
a round for FedAvg; FedSGD's round becomes one full-batch gradient step on all the
data); ``--clients 10 --fraction 0.2`` samples 2 of them a round. Each needs its own lr
grids (docs/benchmarks.md gives the ones that bracket the best).

A run stops at the first round whose test accuracy reaches the top bar (97%) or at its
cap; the table gives the first round at each bar (90/95/97%), the best test accuracy seen,
the wall time, and FedSGD's rounds over FedAvg's per bar, seed by seed (the paper's shape
is >= 10x).

Run: ``.venv/bin/python bench/fedavg_rounds.py [--seeds 0 1] [--max-rounds-sgd 3000]
[--max-rounds-avg 1000] [--sgd-lrs 0.3 1.0 1.5] [--avg-lrs 0.1 0.4 0.8] [--clients 100]
[--fraction 0.1] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

import corral
from corral.federated import LabelShards

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from digits import load_data, make_model

BARS = (0.90, 0.95, 0.97)
#: the default federation: 100 clients, C = 0.1 (10 a round), 2 label shards each
CLIENTS, FRACTION, SHARDS = 100, 0.1, 2
#: (name, local epochs, batch size): FedSGD's batch exceeds any client's data
RULES = {"fedsgd": ("FedSGD E=1 B=all", 1, 100_000), "fedavg": ("FedAvg E=5 B=10", 5, 10)}


class _Reached(Exception):
    """Raised from the report callback to end a run once the top bar is reached."""


def run(
    rule: str,
    lr: float,
    seed: int,
    max_rounds: int,
    workers: int,
    clients: int = CLIENTS,
    fraction: float = FRACTION,
) -> dict[str, Any]:
    """Train one rule until the top bar or `max_rounds`; the rounds to each bar."""
    name, local_epochs, batch_size = RULES[rule]
    x_train, x_test, y_train, y_test = load_data()
    accuracy: list[float] = []  # test accuracy after round i + 1

    def on_report(msg: Any) -> None:
        metrics = (msg.body or {}).get("metrics", {})
        if metrics.get("kind") == "epoch" and not metrics.get("restored"):
            accuracy.append(float(metrics["val_accuracy"]))
            if accuracy[-1] >= BARS[-1]:
                raise _Reached

    trainer = corral.Trainer(
        model=make_model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        strategy=corral.FedAvg(
            clients=clients,
            fraction=fraction,
            local_epochs=local_epochs,
            partition=LabelShards(shards=SHARDS),
        ),
        workers=workers,
        epochs=max_rounds,
        batch_size=batch_size,
        seed=seed,
        checkpoint_every=max_rounds,
    )
    start = time.perf_counter()
    with contextlib.suppress(_Reached):
        trainer.fit((x_train, y_train), validation=(x_test, y_test), on_report=on_report)
    wall = time.perf_counter() - start
    first = {bar: next((i + 1 for i, a in enumerate(accuracy) if a >= bar), None) for bar in BARS}
    return {
        "rule": rule,
        "name": name,
        "lr": lr,
        "seed": seed,
        "cap": max_rounds,
        "rounds": len(accuracy),
        "first": first,
        "best": max(accuracy, default=0.0),
        "wall_s": wall,
    }


def _rank(r: dict[str, Any]) -> tuple[float, ...]:
    """Sort key, best first: the highest bar reached, then fewest rounds to it, then best."""
    reached = [bar for bar in BARS if r["first"][bar] is not None]
    top = max(reached, default=0.0)
    return (-top, r["first"][top] if reached else 0, -r["best"])


def _cell(r: dict[str, Any], bar: float) -> str:
    n = r["first"][bar]
    return str(n) if n is not None else f"not in {r['cap']}"


def _ratio(sgd: dict[str, Any], avg: dict[str, Any], bar: float) -> str:
    a, s = avg["first"][bar], sgd["first"][bar]
    if a is None and s is None:
        return "neither"
    if a is None:
        return f"FedAvg not in {avg['cap']}"
    if s is None:
        return f">{sgd['cap'] / a:.1f}x"
    return f"{s / a:.1f}x"


def _line(r: dict[str, Any]) -> str:
    cells = [r["name"], f"{r['lr']:g}", str(r["seed"])]
    cells += [_cell(r, bar) for bar in BARS]
    cells += [f"{r['best']:.4f}", f"{r['wall_s']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-rounds-sgd", type=int, default=3000)
    parser.add_argument("--max-rounds-avg", type=int, default=1000)
    parser.add_argument("--sgd-lrs", type=float, nargs="+", default=[0.3, 1.0, 1.5])
    parser.add_argument("--avg-lrs", type=float, nargs="+", default=[0.1, 0.4, 0.8])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--fraction", type=float, default=FRACTION)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    caps = {"fedsgd": args.max_rounds_sgd, "fedavg": args.max_rounds_avg}
    grids = {"fedsgd": args.sgd_lrs, "fedavg": args.avg_lrs}
    bars = " / ".join(f"{bar:.0%}" for bar in BARS)
    header = ["rule", "lr", "seed", *(f"rounds to {bar:.0%}" for bar in BARS)]
    header += ["best val_accuracy", "wall s"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    tuning = args.seeds[0]
    print(f"lr grid on seed {tuning} (rounds to {bars}, best):", flush=True)
    best_lr: dict[str, float] = {}
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for rule in RULES:
        tried = []
        for lr in grids[rule]:
            r = run(rule, lr, tuning, caps[rule], args.workers, args.clients, args.fraction)
            tried.append(r)
            print("  " + _line(r), flush=True)
        chosen = min(tried, key=_rank)
        best_lr[rule] = chosen["lr"]
        runs[(rule, tuning)] = chosen
    for seed in args.seeds[1:]:
        for rule in RULES:
            runs[(rule, seed)] = run(
                rule, best_lr[rule], seed, caps[rule], args.workers, args.clients, args.fraction
            )

    per_round = corral.FedAvg(clients=args.clients, fraction=args.fraction).per_round
    print(
        f"\n{args.clients} clients, {SHARDS} label shards each, C={args.fraction} "
        f"({per_round} a round); best lr per rule\n"
    )
    for seed in args.seeds:
        table += [_line(runs[(rule, seed)]) for rule in RULES]
    print("\n".join(table))
    print(f"\nFedSGD rounds / FedAvg rounds ({bars}); the paper's shape is >= 10x:\n")
    print("| seed | " + " | ".join(f"{bar:.0%}" for bar in BARS) + " |")
    print("|---|" + "---|" * len(BARS))
    for seed in args.seeds:
        sgd, avg = runs[("fedsgd", seed)], runs[("fedavg", seed)]
        print(f"| {seed} | " + " | ".join(_ratio(sgd, avg, bar) for bar in BARS) + " |")


if __name__ == "__main__":
    main()
