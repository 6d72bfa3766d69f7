"""Claim: on digits, ASHA reaches the best val_accuracy random search reaches >= 3x sooner.

Local searches (`corral.service.tuning.tune`, each its private job service in a folder
of its own) over the same space (examples/digits_job/space.yaml: optimizer.lr on a log
scale, optimizer.momentum, batch_size) with the same budget: ``--trials`` trials of up to
``--epochs`` epochs, ``--concurrency`` at once. All draw their trials from Optuna's
random sampler with the same seed, so trial *n* has the same values in all; the only
difference is the pruner: ``none`` (random search) against each of ``--pruner``'s (by
default ``asha``, min 1 epoch, η = 3, the earlier runs' setting). Each trial is a job of
its own: examples/digits_job/job.yaml with one worker and AllReduce
(``roles.worker.count: 1``, so two trials fit two cores).

The workload: by default examples/digits.py's 64-128-10 MLP, whose epoch (~0.04 s) is
far cheaper than a trial's start-up. ``--hidden N --layers L`` swaps it for
bench/tune_asha_model.py's ``mlp_NxL`` (L hidden layers of N units) on the same data,
so an epoch can cost more than the start-up (``--hidden 1024 --layers 2``: ~0.8 s on
one core).

The pruners: ``--pruner KIND[:MIN_EPOCHS] ...`` (KIND ``asha`` or ``hyperband``), each a
search of its own against the same random search; a KIND without ``:MIN_EPOCHS`` runs
once per ``--min-epochs`` value (default 1). ``--reduction-factor`` is η for all
(default 3). E.g. ``--pruner asha:1 asha:4 hyperband:1``: ASHA judging at epochs 1, 3, 9,
27; ASHA judging at 4 and 12 (past the early dip of high-lr trials at epoch 3); and
Optuna's Hyperband, brackets from 1 epoch up.

After each search its store (``<folder>/tune.db``) is opened with `Store`, and every
trial job's epoch rows give the measures (each row's ``time`` is written by the job as
it reports the epoch):

- the target: the best val_accuracy any epoch of random search reported;
- time to target: from the search's creation to the first epoch row, of any trial, whose
  val_accuracy is at least the target (random search: when it reported its best);
- the search's wall time (creation to its last job's end), and the epochs trained in all
  (epoch rows: a pruned trial's epochs run before its job was stopped count);
- "time to the lower best of the two": a pruned search against random, and random's row
  against the first pruned search.

``--seeds 0 1`` runs the searches once per seed (random first, then each pruner, per
seed). Each search prints its load average (1 min) before and after to stderr.

Run: ``.venv/bin/python examples/digits_job/prepare.py`` once, then
``.venv/bin/python bench/tune_asha.py`` (``--trials N``, ``--epochs N``,
``--concurrency N``, ``--seeds S [S ...]``, ``--hidden N``, ``--layers N``,
``--pruner KIND[:MIN_EPOCHS] ...``, ``--min-epochs N [N ...]``,
``--reduction-factor N``).
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
#: the wider and deeper MLPs of ``--hidden`` and ``--layers``
MODELS = Path(__file__).resolve().parent / "tune_asha_model.py"


def job_spec(epochs: int, model: tuple[int, int] | None = None) -> dict[str, Any]:
    """job.yaml with absolute paths, one worker, AllReduce and `epochs` epochs; `model`
    (hidden units, hidden layers) swaps its MLP for bench/tune_asha_model.py's."""
    spec = yaml.safe_load((JOB / "job.yaml").read_text())
    module, _, function = spec["entrypoint"].partition(":")
    spec["entrypoint"] = f"{(JOB / module).resolve()}:{function}"
    if model is not None:
        spec["entrypoint"] = f"{MODELS}:mlp_{model[0]}x{model[1]}"
    for part in ("data", "validation"):
        path = (JOB / spec[part]["path"]).resolve()
        if not path.exists():
            sys.exit(f"{path} is missing: run examples/digits_job/prepare.py first")
        spec[part]["path"] = str(path)
    spec["roles"]["worker"]["count"] = 1
    spec["strategy"] = {"kind": "allreduce"}
    spec["epochs"] = epochs
    return spec


@dataclass(frozen=True)
class Variant:
    """A pruner's settings, as `tune` takes them."""

    kind: str
    min_epochs: int = 1
    reduction_factor: int = 3

    @property
    def random(self) -> bool:
        return self.kind == "none"

    @property
    def label(self) -> str:
        if self.random:
            return "random"
        name = {"asha": "ASHA", "hyperband": "Hyperband"}.get(self.kind, self.kind)
        return (f"{name} min {self.min_epochs}, η {self.reduction_factor} "
                "(random sampler)")  # fmt: skip

    @property
    def slug(self) -> str:
        if self.random:
            return "none"
        return f"{self.kind}-m{self.min_epochs}-r{self.reduction_factor}"

    def pruner(self) -> str | dict[str, Any]:
        if self.random:
            return "none"
        return {"kind": self.kind, "min_epochs": self.min_epochs,
                "reduction_factor": self.reduction_factor}  # fmt: skip


RANDOM = Variant("none")


@dataclass
class Run:
    """One search, measured from its store."""

    variant: Variant
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
    #: per trial number: its job's start (seconds since the search's creation), the
    #: epoch it first reported its best at, and seconds from its job's start to that row
    peaks: dict[int, tuple[float, int, float]]

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


def search(variant: Variant, seed: int, args: argparse.Namespace, folder: Path) -> Run:
    space = yaml.safe_load((JOB / "space.yaml").read_text())
    model = None if args.hidden is None else (args.hidden, args.layers)
    start = time.time()
    load = os.getloadavg()[0]
    try:
        detail = tune(
            job_spec(args.epochs, model),
            space,
            metric="val_accuracy",
            mode="max",
            trials=args.trials,
            concurrency=args.concurrency,
            sampler="random",
            pruner=variant.pruner(),
            name=f"{variant.slug}-s{seed}",
            seed=seed,
            folder=folder,
        )
    except SearchFailed as exc:
        detail = exc.detail
    print(f"{variant.label} seed {seed}: {detail.state} in {time.time() - start:.0f} s "
          f"({detail.reason}); load average {load:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after", file=sys.stderr, flush=True)  # fmt: skip
    store = Store(f"sqlite:///{folder / 'tune.db'}")
    try:
        rows: list[tuple[float, float]] = []
        startups, epoch_s, ends = [], [], [detail.created]
        epochs = 0
        trials = {}
        peaks: dict[int, tuple[float, int, float]] = {}
        pruned_past = []
        for trial in detail.trial_list:
            job = store.job(trial.job) if trial.job else None
            if job is None:
                continue
            ends.append(job.ended or job.started or job.submitted)
            got = [m for m in store.metrics(job.id) if m.get("kind") == "epoch"]
            reached = max((float(m["val_accuracy"]) for m in got), default=math.nan)
            trials[trial.number] = (trial.params, trial.state, trial.reason, reached)
            peak = next((m for m in got if float(m["val_accuracy"]) >= reached), None)
            if peak is not None and job.started is not None:
                peaks[trial.number] = (job.started - detail.created, int(peak["epoch"]),
                                       peak["time"] - job.started)  # fmt: skip
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
        variant=variant,
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
        peaks=peaks,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--hidden", type=int, default=None,
                        help="hidden units of bench/tune_asha_model.py's MLP (default: "
                        "examples/digits.py's 64-128-10)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=1, help="its hidden layers (--hidden)")
    parser.add_argument("--pruner", nargs="+", type=pruner_arg, default=[("asha", None)],
                        metavar="KIND[:MIN_EPOCHS]",
                        help="asha or hyperband, each against the same random search; "
                        "without :MIN_EPOCHS, once per --min-epochs")  # fmt: skip
    parser.add_argument("--min-epochs", type=int, nargs="+", default=[1])
    parser.add_argument("--reduction-factor", type=int, default=3)
    args = parser.parse_args()
    variants = [Variant(kind, m, args.reduction_factor)
                for kind, at in args.pruner
                for m in ([at] if at is not None else args.min_epochs)]  # fmt: skip
    load_before = os.getloadavg()
    pairs: list[tuple[Run, list[Run]]] = []
    with tempfile.TemporaryDirectory(prefix="corral-tune-bench-") as tmp:
        for seed in args.seeds:
            random = search(RANDOM, seed, args, Path(tmp, f"random-{seed}"))
            pruned = [search(v, seed, args, Path(tmp, f"{v.slug}-{seed}")) for v in variants]
            pairs.append((random, pruned))
    load_after = os.getloadavg()
    model = ("examples/digits.py's 64-128-10 MLP" if args.hidden is None else
             f"bench/tune_asha_model.py:mlp_{args.hidden}x{args.layers} (64-"
             + "-".join([str(args.hidden)] * args.layers) + "-10)")  # fmt: skip
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (1 min); {model}; {args.trials} trials x up to "
          f"{args.epochs} epochs, {args.concurrency} at once, 1 worker each\n")  # fmt: skip
    print("| seed | search | trials (done/pruned/failed) | epochs trained | best val_accuracy "
          "| time to random's best | random's time / ASHA's | time to the lower best of the "
          "two | wall |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    met: dict[Variant, list[bool]] = {v: [] for v in variants}
    fates = []
    for random, pruned in pairs:
        target = random.best
        base = random.time_to(target)
        for run in (random, *pruned):
            # against random search, or (the random row) against the first pruned search
            lower = min(random.best, (pruned[0] if run is random else run).best)
            reached = run.time_to(target)
            both = run.time_to(lower)
            ratio = "1.00" if run is random else "-"
            if run is not random and reached and base:
                ratio = f"{base / reached:.2f}"
                met[run.variant].append(base / reached >= 3)
            elif run is not random:
                met[run.variant].append(False)
            print(f"| {run.seed} | {run.variant.label} "
                  f"| {run.completed}/{run.pruned}/{run.failed} | {run.epochs} "
                  f"| {run.best:.4f} "
                  f"| {'not reached' if reached is None else f'{reached:.0f} s'} | {ratio} "
                  f"| {lower:.4f} at {'-' if both is None else f'{both:.0f}'} s "
                  f"| {run.wall:.0f} s |")  # fmt: skip
        number = random.best_trial()
        params, _, _, _ = random.trials[number]
        drawn = ", ".join(f"{k.rsplit('.', 1)[-1]} {short(v)}" for k, v in params.items())
        if number in random.peaks and base:
            began, epoch, took = random.peaks[number]
            fates.append(f"seed {random.seed}: in random search trial {number} started at "
                         f"{began:.0f} s and reported its best at epoch {epoch}, {took:.0f} s "
                         f"later: a search that started it at once and pruned nothing of it "
                         f"would be at most {base / took:.2f}x sooner")  # fmt: skip
        for run in pruned:
            same, state, why, got = run.trials.get(number, ({}, "absent", "", math.nan))
            fates.append(f"seed {random.seed}: random's best was trial {number} ({drawn}, "
                         f"val_accuracy {target:.4f}); in {run.variant.label} trial {number} "
                         f"had {'the same' if same == params else 'other'} values and was "
                         f"{state}{f' ({why})' if why else ''}, best val_accuracy "
                         f"{got:.4f}")  # fmt: skip
    print()
    for fate in fates:
        print(fate)
    print("\nwhere a trial's time goes (all trials of all searches above):\n")
    print("| | median | p90 |")
    print("|---|---:|---:|")
    every = [run for random, pruned in pairs for run in (random, *pruned)]
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
    for variant, hits in met.items():
        print(f"\ntarget: {variant.label} reaches random's best >= 3x sooner: "
              f"{'met' if hits and all(hits) else 'not met'} "
              f"({sum(hits)} of {len(hits)} seeds)", end="")  # fmt: skip
    print()
    print("how measured: time from the search's creation in its store to the first epoch row "
          "(the job's own time.time() as it reported) with val_accuracy >= the best any "
          "epoch of random search reported; same seed, same sampled values, same "
          "budget")  # fmt: skip


def pruner_arg(text: str) -> tuple[str, int | None]:
    """``asha``, ``hyperband``, or either with ``:MIN_EPOCHS``."""
    kind, sep, at = text.partition(":")
    if kind not in ("asha", "hyperband") or (sep and not at.isdigit()) or at == "0":
        raise argparse.ArgumentTypeError(f"'{text}' is not asha or hyperband[:MIN_EPOCHS]")
    return kind, int(at) if sep else None


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


if __name__ == "__main__":
    main()
