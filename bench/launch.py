"""Claim: ``corral.run`` gets 2 local workers to their first training step in under 3 s.

Measures seconds from the driver calling the launcher until the first collective runs in
rank 0 (the function calls ``dist.init_process_group("gloo")``, does one tiny all-reduce and
returns ``time.time()``; the driver records ``time.time()`` just before the call), for
``corral.run(fn, workers=2)`` against pyspark's
``TorchDistributor(num_processes=2, local_mode=True, use_gpu=False).run(fn)`` on a
``local[2]`` SparkSession, in the same run. On that session it also measures corral's Spark
engine (``corral.run(fn, workers=2, engine="spark")``: every rank a task of one barrier
stage) against ``TorchDistributor(local_mode=False)``, which also runs in barrier tasks.
SparkSession start-up is excluded from the Spark rows and reported as its own row. Each is
repeated; median and min shown. ratio = TorchDistributor / corral on the same engine kind
(above 1 means corral starts faster).

Run: ``.venv/bin/python bench/launch.py`` (``--repeats N``, ``--workers N``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import corral


def first_step() -> float:
    """The trivial job: join the group, one tiny all-reduce, report when that happened."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    at = time.time()
    dist.destroy_process_group()
    return at


def measure(launch: Callable[[], Any], repeats: int, name: str) -> list[float]:
    """Seconds from the call to the first step in rank 0, once per repeat."""
    times = []
    for i in range(repeats):
        start = time.time()
        at = launch()
        times.append(at - start)
        print(f"{name} repeat {i + 1}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
    return times


def spark_session(workers: int) -> Any:
    from corral.engines.spark import session

    loopback = {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}
    return session(f"local[{workers}]", {**loopback, "spark.ui.enabled": "false"})


def row(name: str, times: list[float] | str, ours: list[float] | None = None) -> str:
    if isinstance(times, str):
        return f"| {name} | {times} | | |"
    med, low = statistics.median(times), min(times)
    ratio = f"{med / statistics.median(ours):.2f}" if ours else "—"
    return f"| {name} | {med:.2f} | {low:.2f} | {ratio} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ours = measure(lambda: corral.run(first_step, workers=args.workers), args.repeats, "corral")

    session: list[float] | str = "not started"
    theirs: list[float] | str = "not run"
    ours_spark: list[float] | str = "not run"
    theirs_spark: list[float] | str = "not run"
    spark = None
    try:
        start = time.time()
        spark = spark_session(args.workers)
        spark.range(1).count()  # the JVM is up and has run a job
        session = [time.time() - start]
        from pyspark.ml.torch.distributor import TorchDistributor

        distributor = TorchDistributor(num_processes=args.workers, local_mode=True, use_gpu=False)
        theirs = measure(lambda: distributor.run(first_step), args.repeats, "TorchDistributor")
        ours_spark = measure(
            lambda: corral.run(first_step, workers=args.workers, engine="spark"),
            args.repeats,
            "corral on Spark",
        )
        on_tasks = TorchDistributor(num_processes=args.workers, local_mode=False, use_gpu=False)
        theirs_spark = measure(
            lambda: on_tasks.run(first_step), args.repeats, "TorchDistributor on tasks"
        )
    except Exception as exc:  # report, don't crash: the corral numbers still stand
        message = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:300]
        failed = f"failed: {message}"
        session = failed if isinstance(session, str) else session
        theirs = failed if isinstance(theirs, str) else theirs
        ours_spark = failed if isinstance(ours_spark, str) else ours_spark
        theirs_spark = failed if isinstance(theirs_spark, str) else theirs_spark
    finally:
        if spark is not None:
            spark.stop()

    print(
        f"\nSeconds from launcher call to first all-reduce in rank 0, {args.workers} workers, "
        f"{args.repeats} repeats; {os.cpu_count()} cores, torch {torch.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}\n"
    )
    print("| launcher | median s | min s | ratio (theirs / corral) |")
    print("|---|---:|---:|---:|")
    print(row(f"corral.run(workers={args.workers})", ours))
    print(row(f"TorchDistributor(num_processes={args.workers}, local_mode=True)", theirs, ours))
    spark_ours = ours_spark if isinstance(ours_spark, list) else None
    print(row(f'corral.run(workers={args.workers}, engine="spark")', ours_spark))
    print(
        row(
            f"TorchDistributor(num_processes={args.workers}, local_mode=False)",
            theirs_spark,
            spark_ours,
        )
    )
    print(row("SparkSession start-up (once, not in the row above)", session))
    print("\nTargets for corral: under 3 s locally; on Spark, 5× faster than TorchDistributor.")


if __name__ == "__main__":
    main()
