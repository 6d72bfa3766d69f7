"""Claim: corral's federated simulation runs >= 5x the client updates per second of
Flower's simulation at <= half its peak memory, on the same model, data and partitions,
at 100 and 1,000 clients; and its overhead per update is within a small multiple of the
update's own compute.

The task, the same on both: scikit-learn's digits scaled /16, split 75/25 stratified with
random_state=0 (as examples/digits.py does); the training rows split IID over N clients;
softmax regression (64 -> 10 and a bias: ``torch.nn.Linear(64, 10)`` with cross-entropy
in corral, the same in NumPy in Flower); every client every round (fraction 1.0, so N
updates a round) does one local epoch of mini-batch SGD (batch 10, lr 0.1) on its shard
and returns its weights and sample count; FedAvg, weighted by samples; 3 rounds
(``--rounds``); accuracy on the test rows after each round (centralised, no federated
evaluation).

- Flower: ``flwr.simulation.run_simulation`` (Flower 1.42, the Ray backend, the Message
  API: a ServerApp running ``flwr.serverapp.strategy.FedAvg``, a ClientApp with
  ``@app.train()``), ``num_cpus=1`` per ClientApp (``--flower-cpus``), so as many Ray
  actors as cores. It runs in its own environment, bench/.venv-flwr, never a corral
  dependency: bench/federated_flower_app.py, started here as a subprocess, which prints
  its measures as JSON (see its docstring).
- corral: ``corral.Trainer(strategy=corral.FedAvg(clients=N, fraction=1.0,
  local_epochs=1, partition=IID()), workers=2, epochs=rounds, batch_size=10)`` and
  ``fit()``, in a subprocess of this script with corral's interpreter (``--side corral``),
  so that each run's memory is its own.

Measured, per run:

- wall s: ``run_simulation`` / ``fit()`` from call to return (start-up and shut-down of
  their processes included; interpreter start and imports not);
- updates/s (wall): N x rounds / wall; updates/s (rounds): N x rounds over the rounds'
  own time: corral, the sum of its history's ``time_s``; Flower, from its first client
  starting (Ray up, actors made, so its start-up is apart: the "start-up s" printed) to
  its last round aggregated;
- peak memory: the largest, over samples every 0.2 s, of the sum over the run's process
  tree (the subprocess and all its descendants: Flower's driver and Ray's GCS, raylet
  and workers; corral's driver and its worker processes) of each process's RSS
  (``/proc/PID/statm``), read by a thread here from /proc (no psutil), and the same sum of
  PSS (``/proc/PID/smaps_rollup``, every 1 s: shared pages split between the processes
  sharing them, where RSS counts a page shared by forked or Ray workers once per
  process);
- client compute ms/update: the mean of the clients' own timing of their local epoch
  (Flower's clients time their NumPy loop; corral's history ``client_compute_s``);
- overhead ms/update: lanes x 1000 / updates/s - compute, for both updates/s, where lanes
  is how many updates run at once (Flower's Ray actors, cores / ``--flower-cpus``;
  corral's ``--workers``; both 2 here): each lane's time per update less the update's
  own compute (1000 / updates/s alone would count two updates' compute in one update's
  wall time, and go negative);
- outside rounds s: wall - rounds s, start-up and shut-down (Flower's start-up alone, to
  its first client, is printed below the tables).

Run (Flower's environment once):

    python3.11 -m venv bench/.venv-flwr
    bench/.venv-flwr/bin/pip install "flwr[simulation]==1.42.*" numpy scikit-learn
    .venv/bin/python bench/federated_sim.py [--clients 100 1000] [--rounds 3]

``--only flower`` or ``--only corral`` runs one side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
FLOWER_PYTHON = HERE / ".venv-flwr" / "bin" / "python"
FLOWER_APP = HERE / "federated_flower_app.py"
PAGE = os.sysconf("SC_PAGE_SIZE")
#: the claim's targets: corral / Flower
TARGET_THROUGHPUT, TARGET_MEMORY = 5.0, 0.5


class TreeMemory(threading.Thread):
    """Samples, every `every` s, the summed RSS of process `root` and all its descendants,
    from /proc, and every `pss_every`-th sample their summed PSS too (smaps_rollup costs
    about a millisecond a process, CPU the runs measured share); keeps the peaks (bytes)
    and the most processes seen."""

    def __init__(self, root: int, every: float = 0.2, pss_every: int = 5) -> None:
        super().__init__(daemon=True)
        self.root, self.every, self.pss_every = root, every, pss_every
        self.samples = 0
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            self.sample()
            if self.done.wait(self.every):
                return

    def sample(self) -> None:
        parents: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        tree, stack = [], [self.root]
        while stack:
            pid = stack.pop()
            tree.append(pid)
            stack.extend(children.get(pid, []))
        rss = pss = 0
        with_pss = self.samples % self.pss_every == 0
        self.samples += 1
        for pid in tree:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    rss += int(f.read().split()[1]) * PAGE
                if not with_pss:
                    continue
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            pss += int(line.split()[1]) * 1024
                            break
            except (OSError, ValueError, IndexError):
                continue
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(tree))


def measured(argv: list[str], timeout: float) -> tuple[dict[str, Any], TreeMemory, str]:
    """Run `argv`, sampling its process tree's memory; its last stdout line's JSON, the
    sampler and its stderr."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    memory.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        memory.done.set()
        memory.join()
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[1]} failed ({proc.returncode}): {err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), memory, err


def warnings_of(stderr: str) -> list[str]:
    """The distinct WARNING lines of Flower's/Ray's log, colours and pids dropped."""
    seen: dict[str, int] = {}
    for line in stderr.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if "WARN" not in line and "Warning" not in line:
            continue
        line = re.sub(r"pid=\d+", "pid=*", line).strip()[:160]
        seen[line] = seen.get(line, 0) + 1
    return [f"{n}x {line}" for line, n in seen.items()]


def flower(python: Path, clients: int, rounds: int, cpus: float) -> dict[str, Any]:
    argv = [str(python), str(FLOWER_APP), "--clients", str(clients),
            "--rounds", str(rounds), "--cpus", str(cpus)]  # fmt: skip
    found, memory, err = measured(argv, timeout=600)
    updates = found["updates"]
    return {
        "side": f"Flower {found['flwr']} (Ray {found['ray']})",
        "lanes": max(1, int((os.cpu_count() or 1) // cpus)),
        "clients": clients,
        "wall_s": found["wall_s"],
        "rounds_s": found["rounds_s"],
        "startup_s": found["startup_s"],
        "round_s": found["round_s"],
        "updates": updates,
        "compute_ms": found["compute_ms"],
        "accuracy": found["accuracy"],
        "rss_mb": memory.peak_rss / 2**20,
        "pss_mb": memory.peak_pss / 2**20,
        "procs": memory.peak_procs,
        "warnings": warnings_of(err),
    }


def corral_run(clients: int, rounds: int, workers: int) -> dict[str, Any]:
    """corral's run, in this process (``--side corral``): the measures as a dict."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import corral
    from corral.federated import IID

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=0
    )
    trainer = corral.Trainer(
        model=lambda: torch.nn.Linear(64, 10),
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        strategy=corral.FedAvg(clients=clients, fraction=1.0, local_epochs=1, partition=IID()),
        workers=workers,
        epochs=rounds,
        batch_size=10,
        seed=0,
    )
    start = time.perf_counter()
    result = trainer.fit((x_train, y_train), validation=(x_test, y_test))
    wall = time.perf_counter() - start
    history = [dict(row) for row in result.history]
    compute = [
        row["client_compute_s"] for row in history if row.get("client_compute_s") is not None
    ]
    return {
        "clients": clients,
        "wall_s": wall,
        "rounds_s": sum(row["time_s"] for row in history),
        "round_s": [row["time_s"] for row in history],
        "updates": sum(int(row["clients"]) for row in history),
        "compute_ms": 1000 * float(np.mean(compute)) if compute else None,
        "accuracy": history[-1].get("val_accuracy"),
        "history": history,
    }


def corral(clients: int, rounds: int, workers: int) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--side", "corral", "--clients", str(clients),
            "--rounds", str(rounds), "--workers", str(workers)]  # fmt: skip
    found, memory, err = measured(argv, timeout=600)
    import corral as package

    return found | {
        "side": f"corral {getattr(package, '__version__', '')}".strip(),
        "startup_s": None,
        "lanes": workers,
        "rss_mb": memory.peak_rss / 2**20,
        "pss_mb": memory.peak_pss / 2**20,
        "procs": memory.peak_procs,
        "warnings": warnings_of(err),
    }


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| side | clients | wall s | outside rounds s | rounds s | updates/s (wall) "
        "| updates/s (rounds) | peak RSS MB | peak PSS MB | processes | compute ms/update "
        "| overhead ms/update (wall) | overhead ms/update (rounds) | final val acc |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["ups_wall"] = r["updates"] / r["wall_s"]
        r["ups_rounds"] = r["updates"] / r["rounds_s"]
        c = r["compute_ms"]
        over_wall = None if c is None else r["lanes"] * 1000 / r["ups_wall"] - c
        over_rounds = None if c is None else r["lanes"] * 1000 / r["ups_rounds"] - c
        outside = r["wall_s"] - r["rounds_s"]
        print(f"| {r['side']} | {r['clients']} | {r['wall_s']:.2f} | {outside:.2f} "
              f"| {r['rounds_s']:.2f} | {r['ups_wall']:.0f} | {r['ups_rounds']:.0f} "
              f"| {r['rss_mb']:.0f} | {r['pss_mb']:.0f} | {r['procs']} | {fmt(c, '.3f')} "
              f"| {fmt(over_wall, '.3f')} | {fmt(over_rounds, '.3f')} "
              f"| {fmt(r['accuracy'], '.2%')} |")  # fmt: skip
    pairs: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        side = "corral" if r["side"].startswith("corral") else "flower"
        pairs.setdefault(r["clients"], {})[side] = r
    both = {n: p for n, p in pairs.items() if len(p) == 2}
    if not both:
        return
    print(f"\ncorral / Flower (target: throughput >= {TARGET_THROUGHPUT:g}x, "
          f"memory <= {TARGET_MEMORY:g}x)\n")  # fmt: skip
    print("| clients | throughput (wall) | throughput (rounds) | memory (RSS) | memory (PSS) "
          "| target met (wall, RSS) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---|")
    for n, p in sorted(both.items()):
        c, f = p["corral"], p["flower"]
        tw, tr = c["ups_wall"] / f["ups_wall"], c["ups_rounds"] / f["ups_rounds"]
        mr, mp = c["rss_mb"] / f["rss_mb"], c["pss_mb"] / f["pss_mb"]
        met = "yes" if tw >= TARGET_THROUGHPUT and mr <= TARGET_MEMORY else "no"
        print(f"| {n} | {tw:.2f}x | {tr:.2f}x | {mr:.2f}x | {mp:.2f}x | {met} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="corral's simulation processes")
    parser.add_argument("--flower-cpus", type=float, default=1.0, help="num_cpus per ClientApp")
    parser.add_argument("--flower", type=Path, default=FLOWER_PYTHON, help="Flower's python")
    parser.add_argument("--only", choices=["flower", "corral"])
    parser.add_argument("--side", choices=["corral"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "corral":  # the subprocess of corral's run
        print(json.dumps(corral_run(args.clients[0], args.rounds, args.workers)), flush=True)
        return
    load_before = os.getloadavg()
    rows = []
    for n in args.clients:
        if args.only != "corral":
            rows.append(flower(args.flower, n, args.rounds, args.flower_cpus))
            print(f"flower {n}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
        if args.only != "flower":
            rows.append(corral(n, args.rounds, args.workers))
            print(f"corral {n}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    before, after = (" ".join(f"{v:.2f}" for v in load) for load in (load_before, load_after))
    print(f"{os.cpu_count()} CPUs; load average before {before}, after {after}")
    table(rows)
    print()
    for r in rows:
        times = [round(t, 3) for t in r["round_s"]]
        up = r["startup_s"]
        start = "" if up is None else f"start-up to first client {up:.2f} s, "
        print(f"{r['side']} {r['clients']} clients, {r['lanes']} lanes: {start}rounds s {times}, "
              f"accuracy {fmt(r['accuracy'], '.2%')}")  # fmt: skip
        for w in r["warnings"]:
            print(f"  warning: {w}")


if __name__ == "__main__":
    main()
