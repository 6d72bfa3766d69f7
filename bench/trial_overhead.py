"""Claim: a corral trial costs at most half the overhead of a Ray Tune trial.

The same trivial search on both, one trial at a time (``--trials`` trials, concurrency 1,
random values of lr): a trial is a tiny real training job, a 2-8-2 MLP on a 200-row
Parquet file for ``--epochs`` epochs, reporting each epoch. corral runs it with
`corral.service.tuning.tune` (its private job service in a temporary folder; each trial a
job, its own processes); Ray Tune runs it as a function trainable in a virtual
environment of its own (bench/.venv-ray, never a corral dependency), measured by
bench/_ray_trial_overhead.py, with the same tiny MLP trained in the trainable (Tune's
defaults: a new actor per trial), a trainable that only reports a constant ``--epochs``
times, and the tiny MLP again with ``reuse_actors=True`` (a trial in the last one's
actor, torch already imported: what corral has no counterpart for).

Per trial, from wall-clock times (``time.time()``):

- launch -> first report: corral, the trial's job submitted (its ``submitted``, in the
  store) to its first epoch row (the ``time`` the job wrote as it reported); Ray, the
  controller asking for the trial's actor to the trainable's first ``tune.report``;
- of which launch -> running: corral, submitted to the job's process started (``started``);
  Ray, to the actor up (``on_trial_start``);
- last report -> end: the last epoch reported to the trial's end as the search sees it
  (corral, the job's ``ended``; Ray, ``on_trial_complete``);
- end -> next launch: a trial's end to the next trial's launch (next job started, for
  corral, in the last column but one);
- per-trial overhead: launch -> first report + last report -> end + end -> next launch
  (medians), the time a trial costs beyond its own epochs.

In the same run, the limits of a fresh process: ``python -c pass``, ``import torch``,
``import corral.service.job`` (what a job's process imports) and ``import
corral.train.worker`` (what its worker process imports), with corral's interpreter.

Make Ray's environment once (``python3.11 -m venv bench/.venv-ray``, then
``bench/.venv-ray/bin/pip install "ray[tune]"`` and torch, the CPU wheel, for the second
row), then run ``.venv/bin/python bench/trial_overhead.py`` (``--trials N``,
``--epochs N``, ``--ray PYTHON``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from corral.service.store import Store
from corral.service.tuning import SearchFailed, tune

HERE = Path(__file__).resolve().parent
RAY_PYTHON = HERE / ".venv-ray" / "bin" / "python"
RAY_SCRIPT = HERE / "_ray_trial_overhead.py"
#: Ray's runs: the work of its trainable, and its row's name
RAY_RUNS = [
    ("torch", "Ray Tune, same tiny MLP"),
    ("constant", "Ray Tune, constant reports"),
    ("torch-reuse", "Ray Tune, same tiny MLP, reuse_actors=True"),
]
MODEL = """
import torch

def make():
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
"""


def tiny_job(folder: Path, epochs: int) -> dict[str, Any]:
    """The trivial trial: tests/conftest.py's tiny job, written into `folder`."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    frame = pd.DataFrame({"a": rng.normal(size=200) + 3 * y, "b": rng.normal(size=200), "y": y})
    frame.to_parquet(folder / "train.parquet")
    (folder / "model.py").write_text(textwrap.dedent(MODEL))
    return {
        "name": "tiny",
        "entrypoint": f"{folder / 'model.py'}:make",
        "data": {"path": str(folder / "train.parquet"), "features": ["a", "b"], "label": "y"},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "epochs": epochs,
        "batch_size": 32,
    }


class WorkerStarts(threading.Thread):
    """Notes, from /proc every 20 ms, when each trial job's worker process started. A
    worker runs in its job's folder; exec'd, its command line names
    ``corral.train.worker``; forked by its job's fork server (the default), it leads a
    session of its own and its parent, the fork server, runs in the same folder. Its start
    time is the kernel's (10 ms ticks), made wall-clock with /proc/uptime."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.jobs = str(folder / "jobs") + "/"
        self.starts: dict[str, float] = {}
        self.done = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        self.boot = time.time() - uptime

    def run(self) -> None:
        seen: set[int] = set()
        while not self.done.wait(0.02):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) in seen:
                    continue
                try:
                    job = self._worker_of(entry)
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                seen.add(int(entry.name))
                if job is not None:
                    self.starts.setdefault(job, self.boot + int(stat[19]) / self.tick)

    def _worker_of(self, entry: Path) -> str | None:
        """The job id of the worker process `entry`, None if it is none."""
        cwd = os.readlink(entry / "cwd")
        if not cwd.startswith(self.jobs):
            return None
        job = cwd[len(self.jobs) :].split("/")[0]
        if b"corral.train.worker" in (entry / "cmdline").read_bytes():
            return job
        stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        leads, parent = stat[3] == entry.name, stat[1]  # session id, parent pid
        return job if leads and os.readlink(f"/proc/{parent}/cwd") == cwd else None


def corral_trials(spec: dict[str, Any], trials: int, folder: Path) -> list[dict[str, Any]]:
    """Run the search; each trial's launch, started, worker started, reports and end, in
    launch order."""
    watch = WorkerStarts(folder)
    watch.start()
    space = {"optimizer.lr": {"low": 1e-3, "high": 0.3, "log": True}}
    try:
        detail = tune(spec, space, metric="loss", mode="min", trials=trials, concurrency=1,
                      sampler="random", pruner="none", name="overhead", folder=folder)  # fmt: skip
    except SearchFailed as exc:
        detail = exc.detail
    watch.done.set()
    watch.join()
    print(f"corral: {detail.state} ({detail.reason})", file=sys.stderr, flush=True)
    store = Store(f"sqlite:///{folder / 'tune.db'}")
    try:
        out = []
        for trial in detail.trial_list:
            job = store.job(trial.job) if trial.job else None
            if job is None:
                continue
            epochs = [m["time"] for m in store.metrics(job.id) if m.get("kind") == "epoch"]
            out.append({"launch": job.submitted, "started": job.started, "reports": epochs,
                        "end": job.ended, "worker": watch.starts.get(job.id)})  # fmt: skip
    finally:
        store.close()
    return sorted(out, key=lambda t: t["launch"])


def ray_trials(python: Path, work: str, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """bench/_ray_trial_overhead.py's JSON, run by Ray's own interpreter; `work` is
    ``torch``, ``constant`` or ``torch-reuse`` (torch with Tune's ``reuse_actors``)."""
    kind = work.removesuffix("-reuse")
    argv = [str(python), str(RAY_SCRIPT), "--trials", str(args.trials), "--epochs",
            str(args.epochs), "--work", kind, "--data", str(data)]  # fmt: skip
    if work.endswith("-reuse"):
        argv.append("--reuse-actors")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"Ray's run failed ({done.returncode}): {done.stderr[-2000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"ray {found['ray']} ({work}): init {found['init_s']:.1f} s, fit {found['fit_s']:.1f} s, "
          f"{len(found['errors'])} errors", file=sys.stderr, flush=True)  # fmt: skip
    return found


def gaps(trials: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each measure of the module's docstring, one value per trial (or pair of trials)."""
    ok = [t for t in trials if t.get("reports") and t.get("end") and t.get("launch")]
    out: dict[str, list[float]] = {
        "first": [t["reports"][0] - t["launch"] for t in ok],
        "running": [t["started"] - t["launch"] for t in ok if t.get("started")],
        "tail": [t["end"] - t["reports"][-1] for t in ok],
        "next": [],
        "next_started": [],
    }
    for a, b in itertools.pairwise(ok):
        out["next"].append(b["launch"] - a["end"])
        if b.get("started"):
            out["next_started"].append(b["started"] - a["end"])
    return out


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {quantile(values, 0.9):.2f}"


def overhead(measured: dict[str, list[float]]) -> float:
    return sum(statistics.median(measured[k]) for k in ("first", "tail", "next"))


def process_floor(code: str, repeats: int = 3) -> float:
    """Median seconds of ``python -c code`` with corral's interpreter."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ray", type=Path, default=RAY_PYTHON, help="Ray's interpreter")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows: list[tuple[str, dict[str, list[float]]]] = []
    ray_notes = []
    with tempfile.TemporaryDirectory(prefix="corral-overhead-") as tmp:
        spec = tiny_job(Path(tmp), args.epochs)
        runs = corral_trials(spec, args.trials, Path(tmp, "tune"))
        rows.append(("corral (a job per trial)", gaps(runs)))
        if args.ray.exists():
            for work, label in RAY_RUNS:
                try:
                    found = ray_trials(args.ray, work, args, Path(tmp, "train.parquet"))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    ray_notes.append(f"{label}: {exc}")
                    continue
                rows.append((f"{label} (ray {found['ray']})", gaps(found["trials"])))
                ray_notes.append(f"{label}: ray.init {found['init_s']:.1f} s (not counted)")
        else:
            ray_notes.append(f"Ray not measured: no interpreter at {args.ray} (see the docstring)")
    floors = {
        "python -c pass": process_floor("pass"),
        "import torch": process_floor("import torch"),
        "import corral.service.job": process_floor("import corral.service.job"),
        "import corral.train.worker": process_floor("import corral.train.worker"),
    }
    load_after = os.getloadavg()
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (1 min); {args.trials} trials of {args.epochs} epochs, "
          f"one at a time\n")  # fmt: skip
    print("seconds, median / p90 over the trials:\n")
    print("| trials of | launch -> first report | of which launch -> running "
          "| last report -> end | end -> next launch | end -> next running "
          "| per-trial overhead (medians) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, measured in rows:
        print(f"| {label} | {cell(measured['first'])} | {cell(measured['running'])} "
              f"| {cell(measured['tail'])} | {cell(measured['next'])} "
              f"| {cell(measured['next_started'])} | {overhead(measured):.2f} |")  # fmt: skip
    trials = [t for t in runs if t["reports"] and t["started"] and t["end"]]
    with_worker = [t for t in trials if t["worker"]]
    steps = [
        ("job submitted -> its process started (the runner)",
         [t["started"] - t["launch"] for t in trials]),
        ("job process started -> its worker process started",
         [t["worker"] - t["started"] for t in with_worker]),
        ("worker process started -> first epoch reported",
         [t["reports"][0] - t["worker"] for t in with_worker]),
        ("the epochs: first report -> last report",
         [t["reports"][-1] - t["reports"][0] for t in trials]),
        ("last report -> job ended (processes exit, the runner sees it)",
         [t["end"] - t["reports"][-1] for t in trials]),
    ]  # fmt: skip
    print(f"\nwhere a corral trial's time goes ({len(with_worker)} of {len(trials)} worker "
          f"processes seen in /proc), seconds:\n")  # fmt: skip
    print("| step | median | p90 |")
    print("|---|---:|---:|")
    for label, values in steps:
        shown = cell(values).split(" / ")
        print(f"| {label} | {' | '.join(shown) if len(shown) == 2 else '- | -'} |")
    print("\nthe limit, a fresh process with corral's interpreter (median of 3):\n")
    print("| python -c | seconds |")
    print("|---|---:|")
    for label, seconds in floors.items():
        print(f"| {label} | {seconds:.2f} |")
    for note in ray_notes:
        print(f"\n{note}")
    ours = overhead(rows[0][1])
    for label, measured in rows[1:]:
        ratio = ours / overhead(measured)
        print(f"\ncorral / {label}: {ratio:.2f} (target <= 0.5: "
              f"{'met' if ratio <= 0.5 else 'not met'})")  # fmt: skip
    print("\nhow measured: wall-clock stamps of each trial's launch (corral: job submitted; "
          "Ray: actor requested), process or actor up, each epoch's report (written by the "
          "trial as it reports) and end as the search sees it; concurrency 1")  # fmt: skip


if __name__ == "__main__":
    main()
