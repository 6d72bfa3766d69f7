"""Claim: on digits, ASHA reaches the best val_accuracy random search reaches >= 3x sooner.

Two local searches (`corral.service.tuning.tune`, each its private job service in a
folder of its own) over the same space (examples/digits_job/space.yaml: optimizer.lr on
a log scale, optimizer.momentum, batch_size) with the same budget: ``--trials`` trials of
up to ``--epochs`` epochs, ``--concurrency`` at once. Both draw their trials from
Optuna's random sampler with the same seed, so trial *n* has the same values in both; the
only difference is the pruner: ``none`` (random search) against ``asha`` (min 1 epoch,
η = 3). Each trial is a job of its own: examples/digits_job/job.yaml with one worker and
AllReduce (``roles.worker.count: 1``, so two trials fit two cores).

After each search its store (``<folder>/tune.db``) is opened with `Store`, and every
trial job's epoch rows give the measures (each row's ``time`` is written by the job as
it reports the epoch):

- the target: the best val_accuracy any epoch of random search reported;
- time to target: from the search's creation to the first epoch row, of any trial, whose
  val_accuracy is at least the target (random search: when it reported its best);
- the search's wall time (creation to its last job's end), and the epochs trained in all
  (epoch rows: a pruned trial's epochs run before its job was stopped count).

``--seeds 0 1`` runs the pair once per seed (random first, then ASHA, per seed).

Run: ``.venv/bin/python examples/digits_job/prepare.py`` once, then
``.venv/bin/python bench/tune_asha.py`` (``--trials N``, ``--epochs N``,
``--concurrency N``, ``--seeds S [S ...]``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from corral.service.store import Store
from corral.service.tuning import SearchFailed, tune

JOB = Path(__file__).resolve().parent.parent / "examples" / "digits_job"


def job_spec(epochs: int) -> dict[str, Any]:
    """job.yaml with absolute paths, one worker, AllReduce and `epochs` epochs."""
    spec = yaml.safe_load((JOB / "job.yaml").read_text())
    module, _, function = spec["entrypoint"].partition(":")
    spec["entrypoint"] = f"{(JOB / module).resolve()}:{function}"
    for part in ("data", "validation"):
        path = (JOB / spec[part]["path"]).resolve()
        if not path.exists():
            sys.exit(f"{path} is missing: run examples/digits_job/prepare.py first")
        spec[part]["path"] = str(path)
    spec["roles"]["worker"]["count"] = 1
    spec["strategy"] = {"kind": "allreduce"}
    spec["epochs"] = epochs
    return spec


@dataclass
class Run:
    """One search, measured from its store."""

    pruner: str
    seed: int
    created: float
    ended: float
    epochs: int
    completed: int
    pruned: int
    failed: int
    #: (seconds since the search's creation, val_accuracy) of every epoch row, by time
    rows: list[tuple[float, float]]
    #: each trial job's start-up: job started -> its first epoch row
    startups: list[float]
    #: each epoch's time_s as the job reports it
    epoch_s: list[float]
    state: str
    #: each pruned trial: epochs its job trained past the epoch it was pruned at, and
    #: seconds from that epoch's report to its job's end
    pruned_past: list[tuple[int, float]]
    #: per trial number: its values, state, why, and the best val_accuracy it reported
    trials: dict[int, tuple[dict[str, Any], str, str, float]]

    @property
    def wall(self) -> float:
        return self.ended - self.created

    @property
    def best(self) -> float:
        return max((a for _, a in self.rows), default=math.nan)

    def best_trial(self) -> int:
        """The trial that reported the best val_accuracy first."""
        return max(self.trials, key=lambda n: (self.trials[n][3], -n))

    def time_to(self, target: float) -> float | None:
        """Seconds from the search's creation to its first epoch at `target` or above."""
        return next((t for t, a in self.rows if a >= target - 1e-12), None)


def search(pruner: str, seed: int, args: argparse.Namespace, folder: Path) -> Run:
    space = yaml.safe_load((JOB / "space.yaml").read_text())
    start = time.time()
    try:
        detail = tune(
            job_spec(args.epochs),
            space,
            metric="val_accuracy",
            mode="max",
            trials=args.trials,
            concurrency=args.concurrency,
            sampler="random",
            pruner=pruner,
            name=f"{pruner}-s{seed}",
            seed=seed,
            folder=folder,
        )
    except SearchFailed as exc:
        detail = exc.detail
    print(f"{pruner} seed {seed}: {detail.state} in {time.time() - start:.0f} s "
          f"({detail.reason})", file=sys.stderr, flush=True)  # fmt: skip
    store = Store(f"sqlite:///{folder / 'tune.db'}")
    try:
        rows: list[tuple[float, float]] = []
        startups, epoch_s, ends = [], [], [detail.created]
        epochs = 0
        trials = {}
        pruned_past = []
        for trial in detail.trial_list:
            job = store.job(trial.job) if trial.job else None
            if job is None:
                continue
            ends.append(job.ended or job.started or job.submitted)
            got = [m for m in store.metrics(job.id) if m.get("kind") == "epoch"]
            reached = max((float(m["val_accuracy"]) for m in got), default=math.nan)
            trials[trial.number] = (trial.params, trial.state, trial.reason, reached)
            at = re.search(r"pruned at epoch (\d+)", trial.reason)
            if trial.state == "pruned" and at and job.ended is not None:
                epoch = int(at.group(1))
                row = next((m for m in got if int(m["epoch"]) == epoch), None)
                if row is not None:
                    pruned_past.append((len(got) - epoch, job.ended - row["time"]))
            epochs += len(got)
            rows += [(m["time"] - detail.created, float(m["val_accuracy"])) for m in got]
            epoch_s += [float(m["time_s"]) for m in got]
            if got and job.started is not None:
                startups.append(got[0]["time"] - job.started)
    finally:
        store.close()
    states = [t.state for t in detail.trial_list]
    return Run(
        pruner=pruner,
        seed=seed,
        created=detail.created,
        ended=max(ends),
        epochs=epochs,
        completed=states.count("complete"),
        pruned=states.count("pruned"),
        failed=states.count("fail"),
        rows=sorted(rows),
        startups=startups,
        epoch_s=epoch_s,
        state=detail.state,
        trials=trials,
        pruned_past=pruned_past,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    load_before = os.getloadavg()
    pairs: list[tuple[Run, Run]] = []
    with tempfile.TemporaryDirectory(prefix="corral-tune-bench-") as tmp:
        for seed in args.seeds:
            random = search("none", seed, args, Path(tmp, f"random-{seed}"))
            asha = search("asha", seed, args, Path(tmp, f"asha-{seed}"))
            pairs.append((random, asha))
    load_after = os.getloadavg()
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (1 min); {args.trials} trials x up to {args.epochs} "
          f"epochs, {args.concurrency} at once, 1 worker each\n")  # fmt: skip
    print("| seed | search | trials (done/pruned/failed) | epochs trained | best val_accuracy "
          "| time to random's best | random's time / ASHA's | time to the lower best of the "
          "two | wall |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    met = []
    fates = []
    for random, asha in pairs:
        target = random.best
        base = random.time_to(target)
        lower = min(random.best, asha.best)
        for run in (random, asha):
            reached = run.time_to(target)
            both = run.time_to(lower)
            name = "random" if run.pruner == "none" else "ASHA (random sampler)"
            ratio = "1.00" if run is random else "-"
            if run is asha and reached and base:
                ratio = f"{base / reached:.2f}"
                met.append(base / reached >= 3)
            elif run is asha:
                met.append(False)
            print(f"| {run.seed} | {name} | {run.completed}/{run.pruned}/{run.failed} "
                  f"| {run.epochs} | {run.best:.4f} "
                  f"| {'not reached' if reached is None else f'{reached:.0f} s'} | {ratio} "
                  f"| {lower:.4f} at {both:.0f} s | {run.wall:.0f} s |")  # fmt: skip
        number = random.best_trial()
        params, _, _, _ = random.trials[number]
        same, state, why, got = asha.trials.get(number, ({}, "absent", "", math.nan))
        values = ", ".join(f"{k.rsplit('.', 1)[-1]} {short(v)}" for k, v in params.items())
        fates.append(f"seed {random.seed}: random's best was trial {number} ({values}); in "
                     f"ASHA trial {number} had {'the same' if same == params else 'other'} "
                     f"values and was {state}{f' ({why})' if why else ''}, best "
                     f"val_accuracy {got:.4f}")  # fmt: skip
    print()
    for fate in fates:
        print(fate)
    print("\nwhere a trial's time goes (all trials of all searches above):\n")
    print("| | median | p90 |")
    print("|---|---:|---:|")
    every = [run for pair in pairs for run in pair]
    startups = [s for run in every for s in run.startups]
    epoch_s = [s for run in every for s in run.epoch_s]
    past = [p for run in every for p in run.pruned_past]
    for label, values, unit in (
        ("trial start-up: job started -> first epoch reported", startups, " s"),
        ("one epoch (the job's time_s)", epoch_s, " s"),
        ("a pruned trial: epochs its job trained past the pruning epoch",
         [float(n) for n, _ in past], ""),
        ("a pruned trial: pruning epoch reported -> its job ended", [t for _, t in past], " s"),
    ):  # fmt: skip
        if values:
            print(f"| {label} | {statistics.median(values):.2f}{unit} "
                  f"| {quantile(values, 0.9):.2f}{unit} |")  # fmt: skip
    print(f"\ntarget: ASHA reaches random's best >= 3x sooner: "
          f"{'met' if met and all(met) else 'not met'} "
          f"({sum(met)} of {len(met)} seeds)")  # fmt: skip
    print("how measured: time from the search's creation in its store to the first epoch row "
          "(the job's own time.time() as it reported) with val_accuracy >= the best any "
          "epoch of random search reported; same seed, same sampled values, same "
          "budget")  # fmt: skip


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


if __name__ == "__main__":
    main()
