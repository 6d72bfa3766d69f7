"""Claim: stale and asynchronous strategies reach 95% on digits sooner than sync under stragglers.

Trains examples/digits.py's MLP (imported from the examples folder, as bench/digits.py
does) on scikit-learn's digits with 4 workers and six strategies — AllReduce, the
parameter server in sync / ssp(staleness 3) / softsync(quorum 2) / async modes (2 servers,
server-side SGD lr 0.05 momentum 0.9, staleness-scaled rates for softsync and async) and
Gossip(peers=1) — under three scenarios: (0) no stragglers; (a) transient stragglers:
every worker's step is 4× slower with probability 0.1; (b) one persistent straggler:
worker rank 1 is always 4× slower. The peer is the synchronous parameter server run in the
same scenario: speed-up = its time to 95% / this row's (higher is better).

Method. A real step of this MLP takes about a millisecond, far less than the fixed costs of
communication, so a slow-down of it would be invisible. The loss callable (`StragglerLoss`,
a picklable ``nn.Module``) therefore models compute: on every worker, every training step
sleeps ``--base-ms`` (default 5 ms), and a slowed step sleeps ``3 × base-ms`` more, so its
modelled compute takes 4×. Whether a step is slowed is drawn from ``random.Random(rank)``
(the same draws for every strategy). The sleep happens inside the training step, so it is
in each epoch's ``time_s``; validation (run under ``no_grad``) is not slowed. Each worker
also measures its typical step (the median wall time between two loss calls of its first
epoch, minus the sleeps) and reports it; the header shows what that overhead is.

Time to 95% is read two ways. Σ time_s: the sum of rank 0's per-epoch training time
(``history[i]["time_s"]``) up to the first epoch whose val_accuracy ≥ 0.95. Training wall:
on the caller's clock, from rank 0's first training step (the loss reports it) until that
epoch's report arrives; it adds validation and checkpoints (the same for every strategy)
and, unlike Σ time_s, the time rank 0 waits for slower workers at the epoch-end metrics
all-reduce, which is outside its ``time_s`` — so for strategies that never wait inside an
epoch (PS async/softsync) Σ time_s understates the time the run took. Both speed-ups are
shown (PS sync's time / this row's, higher is better); total wall is the whole ``fit()``,
worker start-up included.

Read with care: corral gives every worker the same number of steps per epoch and ends each
epoch with a metrics all-reduce, which acts as a barrier. So a persistent straggler sets
every strategy's per-epoch pace; async/softsync cannot let the fast workers run ahead
across epochs, and can win only by needing fewer epochs.

4 workers plus 2 server processes on a 2-core machine are oversubscribed: timings include
CPU contention, which the header states.

Run: ``.venv/bin/python bench/stragglers.py`` (``--epochs 40``, ``--scenarios none
transient persistent``, ``--strategies allreduce ps-sync ps-ssp ps-softsync ps-async
gossip``, ``--base-ms 5``). About 10–15 minutes with the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import corral
from corral.comm.control import Message
from corral.entrypoints import load_file_module

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits.py"
TARGET = 0.95
WORKERS = 4
SLOWDOWN = 4.0  # a slowed step's modelled compute is this many times the normal one
SERVER_SGD = {"lr": 0.05, "momentum": 0.9}
STRATEGIES: dict[str, Callable[[], corral.Strategy]] = {
    "allreduce": lambda: corral.AllReduce(),
    "ps-sync": lambda: corral.ParameterServer(mode="sync", servers=2, optimizer_args=SERVER_SGD),
    "ps-ssp": lambda: corral.ParameterServer(
        mode="ssp", staleness=3, servers=2, optimizer_args=SERVER_SGD
    ),
    "ps-softsync": lambda: corral.ParameterServer(
        mode="softsync", quorum=2, lr_scaling="staleness", servers=2, optimizer_args=SERVER_SGD
    ),
    "ps-async": lambda: corral.ParameterServer(
        mode="async", lr_scaling="staleness", servers=2, optimizer_args=SERVER_SGD
    ),
    "gossip": lambda: corral.Gossip(peers=1),
}
LABELS = {
    "allreduce": "AllReduce()",
    "ps-sync": "PS sync",
    "ps-ssp": "PS ssp (staleness 3)",
    "ps-softsync": "PS softsync (quorum 2, lr/staleness)",
    "ps-async": "PS async (lr/staleness)",
    "gossip": "Gossip(peers=1)",
}
SCENARIOS = {
    "none": "(0) no stragglers",
    "transient": "(a) transient stragglers: every worker's step 4× slower with probability 0.1",
    "persistent": "(b) one persistent straggler: rank 1 always 4× slower",
}
BASELINE = "ps-sync"


class StragglerLoss(torch.nn.Module):
    """Cross-entropy that also models compute time and, per scenario, slows some steps.

    Every training call sleeps `base_s`; a slowed call sleeps ``(SLOWDOWN - 1) × base_s``
    more. Calls without autograd (validation) are not delayed. Built on the caller,
    cloudpickled to every worker; per-worker state is created at the first call there.
    """

    def __init__(self, scenario: str, base_s: float, probability: float = 0.1) -> None:
        super().__init__()
        self.scenario, self.base_s, self.probability = scenario, base_s, probability
        self._rank: int | None = None
        self._rng: random.Random | None = None
        self._last: float | None = None
        self._slept = 0.0
        self._intervals: list[float] = []

    def _slowed(self) -> bool:
        assert self._rng is not None
        if self.scenario == "transient":
            return self._rng.random() < self.probability
        return self.scenario == "persistent" and self._rank == 1

    def _measure(self, now: float) -> None:
        """Collect the first epoch's wall time between calls, minus our sleeps; report once."""
        if self._last is not None and len(self._intervals) < 10:
            self._intervals.append(now - self._last - self._slept)
            if len(self._intervals) == 10:
                corral.context().report(
                    kind="step_overhead", overhead_s=statistics.median(self._intervals)
                )
        self._last = now

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(out, y)
        if not torch.is_grad_enabled():
            return loss
        if self._rank is None:
            self._rank = corral.context().rank
            self._rng = random.Random(self._rank)
            if self._rank == 0:
                corral.context().report(kind="first_step")  # the driver notes the time
        self._measure(time.perf_counter())
        delay = self.base_s * (SLOWDOWN if self._slowed() else 1.0)
        time.sleep(delay)
        self._slept = delay
        return loss


def load_example() -> ModuleType:
    return load_file_module(EXAMPLE)


def first_reaching(values: list[float]) -> int | None:
    """Index of the first value ≥ TARGET, or None."""
    return next((i for i, v in enumerate(values) if v >= TARGET), None)


def run(
    example: ModuleType, strategy: str, scenario: str, args: argparse.Namespace, tmp: str
) -> dict[str, Any]:
    """Train once; time to target both from time_s and from the driver's clock."""
    x_train, x_test, y_train, y_test = example.load_data()
    trainer = corral.Trainer(
        model=example.make_model,
        loss=StragglerLoss(scenario, args.base_ms / 1000),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        strategy=STRATEGIES[strategy](),
        workers=WORKERS,
        epochs=args.epochs,
        batch_size=32,
        checkpoint_dir=f"{tmp}/{scenario}-{strategy}",
    )
    arrivals: dict[int, float] = {}  # epoch → driver clock when its report arrived
    first_step: list[float] = []
    overheads: list[float] = []
    start = time.monotonic()

    def on_report(msg: Message) -> None:
        metrics = msg.body["metrics"] if msg.body else {}
        if metrics.get("kind") == "epoch":
            arrivals[int(metrics["epoch"])] = msg.received
        elif metrics.get("kind") == "first_step":
            first_step.append(msg.received)
        elif metrics.get("kind") == "step_overhead":
            overheads.append(float(metrics["overhead_s"]))

    row: dict[str, Any] = {"strategy": strategy, "scenario": scenario, "overheads": overheads}
    try:
        result = trainer.fit((x_train, y_train), validation=(x_test, y_test), on_report=on_report)
    except Exception as exc:  # a benchmark reports a failure and goes on
        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        row["wall_s"] = time.monotonic() - start
        return row
    row["wall_s"] = time.monotonic() - start
    history = result.history
    accuracies = [h["val_accuracy"] for h in history]
    hit = first_reaching(accuracies)
    row["final_acc"] = accuracies[-1]
    row["epochs"] = None if hit is None else hit + 1
    row["time_s"] = None if hit is None else sum(h["time_s"] for h in history[: hit + 1])
    row["startup_s"] = first_step[0] - start if first_step else None
    row["driver_s"] = arrivals[hit + 1] - first_step[0] if hit is not None and first_step else None
    return row


def cell(value: float | None, fmt: str) -> str:
    return "not reached" if value is None else format(value, fmt)


def print_table(scenario: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n### {SCENARIOS[scenario]}\n")
    print(
        "| strategy | time to 95% s (Σ time_s) | training wall to 95% s | epochs to 95% "
        "| final val acc | total wall s | speed-up vs PS sync (Σ time_s) "
        "| speed-up vs PS sync (training wall) | load (1 min) after |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = next((r for r in rows if r["strategy"] == BASELINE and "error" not in r), {})
    for r in rows:
        if "error" in r:
            print(
                f"| {LABELS[r['strategy']]} | failed: {r['error']} | | | | {r['wall_s']:.1f} | | "
                f"| {r['load']:.1f} |"
            )
            continue
        print(
            f"| {LABELS[r['strategy']]} | {cell(r['time_s'], '.2f')} "
            f"| {cell(r['driver_s'], '.2f')} | {cell(r['epochs'], 'd')} "
            f"| {r['final_acc']:.2%} | {r['wall_s']:.1f} "
            f"| {ratio(base.get('time_s'), r['time_s'])} "
            f"| {ratio(base.get('driver_s'), r['driver_s'])} | {r['load']:.1f} |"
        )


def ratio(baseline: float | None, this: float | None) -> str:
    return "—" if baseline is None or not this else f"{baseline / this:.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument(
        "--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES)
    )
    parser.add_argument(
        "--base-ms", type=float, default=5.0, help="modelled compute slept every step"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    example = load_example()
    load_before = os.getloadavg()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios:
            for strategy in args.strategies:
                r = run(example, strategy, scenario, args, tmp)
                r["load"] = os.getloadavg()[0]
                status = r.get("error") or (
                    f"95% at epoch {r['epochs']}" if r["epochs"] else "95% not reached"
                ) + (f", final {r['final_acc']:.2%}" if "error" not in r else "")
                print(
                    f"{scenario:<10} {strategy:<11} {status} ({r['wall_s']:.1f} s, "
                    f"load {r['load']:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
                results.setdefault(scenario, []).append(r)
    load_after = os.getloadavg()
    overheads = [o for rows in results.values() for r in rows for o in r["overheads"]]
    overhead = f"{statistics.median(overheads) * 1000:.1f} ms" if overheads else "n/a"
    startups = [r["startup_s"] for rows in results.values() for r in rows if r.get("startup_s")]
    startup = f"{statistics.median(startups):.1f} s" if startups else "n/a"
    print(
        f"\nDigits (sklearn, 1347 train / 450 test), MLP 64-128-10, {WORKERS} workers, "
        f"batch 32/worker, {args.epochs} epochs, target {TARGET:.0%} val accuracy; "
        f"modelled compute {args.base_ms:g} ms/step, slowed steps {SLOWDOWN:g}× "
        f"(+{(SLOWDOWN - 1) * args.base_ms:g} ms); measured real step overhead beyond it "
        f"(median over workers and runs) {overhead}; worker start-up (fit() to first "
        f"step, median) {startup}.\n"
        f"{os.cpu_count()} cores, torch {torch.__version__}, {platform.machine()}; "
        f"{WORKERS} workers (+2 server processes for PS) on {os.cpu_count()} cores: "
        f"oversubscribed. Load average (1 min) {load_before[0]:.2f} at start, "
        f"{load_after[0]:.2f} at end."
    )
    for scenario in args.scenarios:
        print_table(scenario, results.get(scenario, []))


if __name__ == "__main__":
    main()
