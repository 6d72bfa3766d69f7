"""Claim: corral trains on a Spark DataFrame ≥ 3× faster, in less memory, than the Parquet route.

A DataFrame of ``--rows`` rows (default 2M) with 32 float features and a 0/1 label is
generated inside Spark (``rand`` columns; nothing on the driver) and cached. Two workers
train a small MLP (32-64-2) for one epoch, batch 1024, SGD, DDP all-reduce, three ways, in
the same run:

* **corral**: ``Trainer(..., strategy=AllReduce(), workers=2, engine="spark").fit(df)``.
  Each barrier task spills its partition as Arrow blocks to local disk and its worker
  reads them back one block at a time.
* **Parquet route**: what Horovod on Spark does, and what Petastorm's
  ``make_spark_converter`` does underneath. The DataFrame is written to Parquet, then
  ``TorchDistributor(num_processes=2, local_mode=True)`` runs a DDP function whose ranks
  each stream their half of the files with pyarrow (``ParquetFile.iter_batches``, one
  batch of 1024 rows in memory at a time, files in a seeded order, rows shuffled within a
  batch) and train. Petastorm itself is tried first and reported if it cannot be imported.
* **Floor**: what any route must pay at least, both parts measured here: Spark's own
  export of the DataFrame to Python as Arrow (``mapInArrow`` over its partitions, each
  batch dropped as it arrives), plus corral's training of the epoch alone (its workers'
  ``time_s``: steps only, no start-up, no spill).

Wall time counts from the call to the trained model, the Parquet write included. Memory is
sampled the same way on both sides: the training loss (``RssLoss``) records its process's
peak RSS (``ru_maxrss``) at every step; the table shows the larger of the two workers, at
the first step (imports and model: what a worker costs before data) and at the end.
ratio = Parquet route / corral.

Run: ``.venv/bin/python bench/spark_ingest.py`` (``--rows 500000`` for a quick run).
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import corral

FEATURES = [f"f{i}" for i in range(32)]
BATCH = 1024


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))


class RssLoss(torch.nn.Module):
    """Cross-entropy that records this process's peak RSS in `folder/<pid>` at every step:
    ``first peak`` (KiB) from the first step, the current peak after it."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder, self.first = folder, 0

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.first = self.first or peak_kb
        Path(self.folder, str(os.getpid())).write_text(f"{self.first} {peak_kb}")
        return torch.nn.functional.cross_entropy(out, y)


def read_rss(folder: Path) -> tuple[float, float]:
    """The largest first-step and final peak RSS (MiB) that `RssLoss` recorded in `folder`."""
    samples = [[int(kb) for kb in p.read_text().split()] for p in folder.iterdir()]
    return max(s[0] for s in samples) / 1024, max(s[1] for s in samples) / 1024


def parquet_worker(files: list[str], rss_folder: str) -> None:
    """One rank of the Parquet route: stream its files batch by batch, train one epoch."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = files[rank::world]
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in mine)
    steps = torch.tensor([rows // BATCH])
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)  # same step count on both ranks
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = RssLoss(rss_folder)
    rng = np.random.default_rng(rank)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for f in rng.permutation(mine):
            for batch in pq.ParquetFile(f).iter_batches(BATCH, columns=[*FEATURES, "y"]):
                if batch.num_rows < BATCH:
                    continue  # a file's tail: keep every step a full batch, as corral's are
                order = rng.permutation(batch.num_rows)
                x = np.column_stack([batch.column(c).to_numpy() for c in FEATURES])[order]
                y = batch.column("y").to_numpy()[order].astype(np.int64)
                yield torch.from_numpy(x), torch.from_numpy(y)

    for _, (x, y) in zip(range(int(steps)), batches(), strict=False):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    dist.destroy_process_group()


def spark_arrow_export(df: Any, rows: int) -> float:
    """Seconds for Spark to hand every partition of `df` to Python as Arrow batches, each
    dropped on arrival: the transfer every Python consumer of the DataFrame pays."""
    import pyarrow as pa

    def drop(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        rows = sum(b.num_rows for b in batches)
        yield pa.RecordBatch.from_pydict({"rows": [rows]})

    start = time.perf_counter()
    counted = df.mapInArrow(drop, "rows long").collect()
    seconds = time.perf_counter() - start
    assert sum(r.rows for r in counted) == rows
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import functions as F

    from corral.engines.spark import session

    loopback = {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}
    conf = {**loopback, "spark.ui.enabled": "false", "spark.driver.memory": "4g"}
    spark = session("local[2]", conf)
    df = spark.range(args.rows, numPartitions=2).select(
        *(F.rand(seed=i).cast("float").alias(f) for i, f in enumerate(FEATURES))
    )
    df = df.withColumn("y", ((F.col("f0") + F.col("f1")) > 1).cast("int")).cache()
    df.count()  # generated once, before any side is timed
    tmp = Path(tempfile.mkdtemp(prefix="corral-ingest-"))
    try:
        rss = tmp / "rss-corral"
        rss.mkdir()
        start = time.perf_counter()
        result = corral.Trainer(
            model=make_model,
            loss=RssLoss(str(rss)),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
            strategy=corral.AllReduce(),
            workers=2,
            epochs=1,
            batch_size=BATCH,
            checkpoint_dir=tmp / "ckpt",
            engine="spark",
        ).fit(df, features=FEATURES, label="y", on_report=None)
        ours = time.perf_counter() - start
        trained_s = result.history[0]["time_s"]
        ours_mb = read_rss(rss)

        try:
            import petastorm  # noqa: F401

            petastorm_note = "importable, but this bench runs the Parquet route it builds on"
        except Exception as exc:
            petastorm_note = f"not usable here ({type(exc).__name__}: {str(exc)[:80]})"
        rss = tmp / "rss-parquet"
        rss.mkdir()
        start = time.perf_counter()
        out = tmp / "parquet"
        df.write.parquet(str(out))
        files = sorted(glob.glob(str(out / "*.parquet")))
        distributor = TorchDistributor(num_processes=2, local_mode=True, use_gpu=False)
        distributor.run(parquet_worker, files, str(rss))
        theirs = time.perf_counter() - start
        theirs_mb = read_rss(rss)

        export_s = spark_arrow_export(df, args.rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        spark.stop()

    print(
        f"\n{args.rows:,} rows × 32 float features, 2 workers, 1 epoch, batch {BATCH}; "
        f"{os.cpu_count()} cores, torch {torch.__version__}, python "
        f"{platform.python_version()}; Petastorm: {petastorm_note}\n"
    )
    print(
        "| route | wall s to trained model | RSS per worker at its first step MB "
        "| peak RSS per worker MB | ratio (theirs / corral) |"
    )
    print("|---|---:|---:|---:|---:|")
    print(
        f"| corral, engine='spark' (Arrow spill per task) | {ours:.1f} | {ours_mb[0]:.0f} "
        f"| {ours_mb[1]:.0f} | — |"
    )
    ratio = f"{theirs / ours:.2f}× time, {theirs_mb[1] / ours_mb[1]:.2f}× memory"
    print(
        f"| Parquet route: write, then TorchDistributor + pyarrow iter_batches | {theirs:.1f} "
        f"| {theirs_mb[0]:.0f} | {theirs_mb[1]:.0f} | {ratio} |"
    )
    floor = export_s + trained_s
    print(
        f"| floor: Spark's Arrow export ({export_s:.1f} s) + training alone ({trained_s:.1f} s) "
        f"| {floor:.1f} | | | {floor / ours:.2f}× time |"
    )
    print(
        f"\ncorral's {ours:.1f} s: {trained_s:.1f} s training the epoch, "
        f"{ours - trained_s:.1f} s checking the DataFrame, spilling and starting workers"
    )
    print("Targets for corral: ≥ 3× faster than the Parquet route, lower peak memory.")


if __name__ == "__main__":
    main()
