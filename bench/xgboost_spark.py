"""Claim: ``kind: xgboost`` on Spark costs at most 10% more time than xgboost.spark alone.

Both train the same binary classifier on the same data (``--rows`` x ``--features``
synthetic rows in one Parquet file: a logistic model of 8 features and one interaction,
so neither is perfect) with the same parameters (``--rounds`` rounds, max_depth 6,
learning_rate 0.1, seed 0, no per-round log) and 2 workers on ``local[2]``:

- plain: ``spark.read.parquet`` and ``xgboost.spark.SparkXGBClassifier(features_col=[...],
  num_workers=2).fit(df)``;
- corral: ``corral.classic.fit`` of the `corral.spec.parse_job` of a ``kind: xgboost``
  spec, which on top checks the data in one Spark job over the label column (its rows,
  null and NaN labels, and distinct values, the classes; NaN features are XGBoost's
  missing values, not looked for), has XGBoost evaluate ``error`` each round (for
  ``train_accuracy``), and pickles the model to ``model.pkl``.

One untimed warm-up of each, then ``--repeats`` pairs, interleaved (plain first in even
pairs, corral first in odd ones). Accuracy is measured outside the timing for both, on
``--rows // 4`` held-out rows, scored with NumPy on the driver.

Run: ``.venv/bin/python bench/xgboost_spark.py`` (``--rows N``, ``--features N``,
``--rounds N``, ``--repeats N``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyspark
import xgboost as xgb

import corral.classic
from corral.engines.spark import session
from corral.spec import parse_job

#: The test driver's settings: loopback only, no web UI, no progress bars on stderr.
CONF = {
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
}
PARAMS: dict[str, Any] = {"max_depth": 6, "learning_rate": 0.1}


def synthetic(rows: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows labelled by a noisy logistic model of their first 8 features and one product."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, width)).astype(np.float32)
    weights = np.random.default_rng(0).normal(size=8)
    logit = x[:, :8] @ weights + 0.5 * x[:, 8] * x[:, 9]
    return x, (logit + rng.logistic(size=rows) > 0).astype(np.int64)


def write(path: Path, x: np.ndarray, y: np.ndarray) -> list[str]:
    names = [f"f{i}" for i in range(x.shape[1])]
    pd.DataFrame(x, columns=names).assign(y=y).to_parquet(path)
    return names


def plain(spark: Any, path: Path, names: list[str], rounds: int) -> Any:
    from xgboost.spark import SparkXGBClassifier

    df = spark.read.parquet(str(path))
    estimator = SparkXGBClassifier(
        features_col=names,
        label_col="y",
        num_workers=2,
        n_estimators=rounds,
        random_state=0,
        verbose=False,
        **PARAMS,
    )
    return estimator.fit(df).get_booster()


def with_corral(path: Path, rounds: int, out: Path) -> Any:
    spec = parse_job(
        {
            "kind": "xgboost",
            "engine": "spark",
            "spark": {"master": "local[2]", "conf": CONF},
            "data": {"path": str(path), "label": "y"},
            "roles": {"worker": {"count": 2}},
            "rounds": rounds,
            "seed": 0,
            "params": PARAMS,
        }
    )
    return corral.classic.fit(spec, base=path.parent, out=out)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.features < 10:
        sys.exit("--features must be at least 10 (the label uses the first 10)")
    spark = session("local[2]", CONF)
    times: dict[str, list[float]] = {"plain": [], "corral": []}
    accuracy: dict[str, float] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="corral-xgb-bench-") as tmp:
        path = Path(tmp, "train.parquet")
        names = write(path, *synthetic(args.rows, args.features, seed=1))
        x_test, y_test = synthetic(args.rows // 4, args.features, seed=2)

        def run(name: str, timed: bool) -> None:
            start = time.perf_counter()
            if name == "plain":
                booster = plain(spark, path, names, args.rounds)
                seconds = time.perf_counter() - start
                predicted = booster.predict(xgb.DMatrix(x_test, feature_names=names)) > 0.5
            else:
                result = with_corral(path, args.rounds, Path(tmp, "out"))
                seconds = time.perf_counter() - start
                predicted = result.model.predict(x_test)
            accuracy[name] = float((predicted == y_test).mean())
            if timed:
                times[name].append(seconds)
            print(f"{name}: {seconds:.2f} s{'' if timed else ' (warm-up)'}",
                  file=sys.stderr, flush=True)  # fmt: skip

        run("plain", timed=False)
        run("corral", timed=False)
        for i in range(args.repeats):
            for name in ("plain", "corral") if i % 2 == 0 else ("corral", "plain"):
                run(name, timed=True)
    load_after = os.getloadavg()
    spark.stop()
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"xgboost {xgb.__version__}, pyspark {pyspark.__version__}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min); {args.rows} rows "
          f"x {args.features} features, {args.rounds} rounds, 2 workers on local[2], "
          f"{args.repeats} interleaved repeats\n")  # fmt: skip
    print("| | median s | min s | max s | held-out accuracy | overhead |")
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(times["plain"])
    for name, label in (("plain", "xgboost.spark alone"), ("corral", "corral kind: xgboost")):
        median = statistics.median(times[name])
        overhead = "-" if name == "plain" else f"{100 * (median / base - 1):+.1f}%"
        print(f"| {label} | {median:.2f} | {min(times[name]):.2f} | {max(times[name]):.2f} "
              f"| {accuracy[name]:.4f} | {overhead} |")  # fmt: skip
    met = statistics.median(times["corral"]) <= 1.10 * base
    print(f"\ntarget: overhead <= 10%: {'met' if met else 'not met'}")


if __name__ == "__main__":
    main()
