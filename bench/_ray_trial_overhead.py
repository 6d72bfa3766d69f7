"""The Ray Tune half of bench/trial_overhead.py, run by Ray's own interpreter.

Not a corral script: it imports only Ray (and, with ``--work torch``, torch, pandas), and
runs in a virtual environment of its own (bench/.venv-ray), so Ray is never a dependency
of corral. Prints one JSON object: Ray's version, ``ray.init``'s seconds, and per trial,
in launch order, the wall-clock times (``time.time()``) of

- ``launch``: the Tune controller asking for the trial's actor (its
  ``_schedule_trial_actor``, wrapped to note the time; ``on_trial_start`` where that
  method is not there);
- ``started``: the actor up (``Callback.on_trial_start``);
- ``reports``: each ``tune.report``, stamped by the trainable just before it reports;
- ``end``: the controller seeing the trial complete (``Callback.on_trial_complete``).

``--work constant`` reports a constant metric ``--epochs`` times with no work; ``--work
torch`` trains corral's tiny job (its model and Parquet file, ``--data``) for
``--epochs`` epochs in the trainable, torch imported there. ``--reuse-actors`` sets
Tune's ``reuse_actors`` (off by default), so a trial may run in the previous trial's
actor, torch already imported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any


def constant(config: dict[str, Any]) -> None:
    from ray import tune

    for epoch in range(1, config["epochs"] + 1):
        tune.report({"loss": 1.0, "epoch": epoch, "t": time.time()})


def torch_job(config: dict[str, Any]) -> None:
    """The same trial corral runs: the tiny MLP on the 200-row Parquet file, SGD."""
    import pandas as pd
    import torch
    from ray import tune

    frame = pd.read_parquet(config["data"])
    x = torch.tensor(frame[["a", "b"]].to_numpy(), dtype=torch.float32)
    y = torch.tensor(frame["y"].to_numpy(), dtype=torch.long)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    for epoch in range(1, config["epochs"] + 1):
        total = 0.0
        for start in range(0, len(x), 32):
            optimizer.zero_grad()
            batch = slice(start, start + 32)
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += float(loss)
        tune.report({"loss": total, "epoch": epoch, "t": time.time()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work", choices=["constant", "torch"], default="constant")
    parser.add_argument("--data", default="")
    parser.add_argument("--reuse-actors", action="store_true", help="Tune's reuse_actors")
    args = parser.parse_args()

    start = time.time()
    import ray
    from ray import tune
    from ray.tune.execution import tune_controller

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    init_s = time.time() - start

    times: dict[str, dict[str, Any]] = defaultdict(lambda: {"reports": []})
    order: list[str] = []
    schedule = getattr(tune_controller.TuneController, "_schedule_trial_actor", None)
    if schedule is not None:

        def noted(self: Any, trial: Any) -> Any:
            times[trial.trial_id].setdefault("launch", time.time())
            if trial.trial_id not in order:
                order.append(trial.trial_id)
            return schedule(self, trial)

        tune_controller.TuneController._schedule_trial_actor = noted

    class Times(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            now = time.time()
            times[trial.trial_id]["started"] = now
            times[trial.trial_id].setdefault("launch", now)
            if trial.trial_id not in order:
                order.append(trial.trial_id)

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            times[trial.trial_id]["reports"].append(result["t"])

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            times[trial.trial_id]["end"] = time.time()

    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        tuner = tune.Tuner(
            constant if args.work == "constant" else torch_job,
            param_space={
                "lr": tune.loguniform(1e-3, 0.3),
                "epochs": args.epochs,
                "data": args.data,
            },
            tune_config=tune.TuneConfig(
                metric="loss",
                mode="min",
                num_samples=args.trials,
                max_concurrent_trials=1,
                reuse_actors=args.reuse_actors,
            ),
            run_config=tune.RunConfig(storage_path=tmp, verbose=0, callbacks=[Times()]),
        )
        began = time.time()
        results = tuner.fit()
        fit_s = time.time() - began
    errors = [str(r.error) for r in results if r.error]
    ray.shutdown()
    json.dump(
        {
            "ray": ray.__version__,
            "init_s": init_s,
            "fit_s": fit_s,
            "errors": errors,
            "trials": [times[t] for t in order],
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
