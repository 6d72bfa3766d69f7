"""Flower's side of bench/federated_sim.py: run in Flower's own environment (bench/.venv-flwr).

``bench/.venv-flwr/bin/python bench/federated_flower_app.py --clients N --rounds R``
runs Flower's simulation (``flwr.simulation.run_simulation`` on its Ray backend, the
Message API: a `ServerApp` whose main runs ``flwr.serverapp.strategy.FedAvg``, a
`ClientApp` with a ``@app.train()`` function) and prints one JSON line of its measures.

The task, the same as corral's side: scikit-learn's digits scaled /16, split 75/25
stratified with random_state=0; the training rows split IID over N clients (a permutation
seeded 0, ``np.array_split``); a NumPy softmax regression (64 -> 10 weights and a bias,
initialised as torch's ``nn.Linear`` is: uniform within +-1/8); each client, every round
(fraction_train=1.0), one local epoch of mini-batch SGD (batch 10, lr 0.1, mean
cross-entropy) on its shard, returning its weights and its sample count; FedAvg weighted
by sample count; no federated evaluation (fraction_evaluate=0), a centralised accuracy on
the test rows after each round in the server (``evaluate_fn``).

Each client times its own local epoch (``time.perf_counter`` around the NumPy loop) and
returns it, with the wall-clock time it started and ended, as metrics; the strategy's
metric aggregation (in this, the driver's, process) keeps them. Measures printed:

- ``wall_s``: ``run_simulation`` from call to return;
- ``startup_s``: from that call to the first client's start (Ray's start-up, its actors,
  the first message delivered);
- ``rounds_s``: from the first client's start to the last round aggregated (steady state);
- ``round_s``: each round's time (round 1 from the first client's start, the others from
  the previous round's aggregation);
- ``compute_ms``: the mean of the clients' local-epoch times;
- ``accuracy``: the final centralised test accuracy.

The objects the Ray workers run are pickled by reference to this module (it imports
itself as ``federated_flower_app``; Flower puts the driver's ``sys.path`` on the workers'
``PYTHONPATH``), so each worker loads the digits once and keeps its shards.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any

import numpy as np

#: the local optimiser and batch, the same as corral's side
LR = 0.1
BATCH = 10
#: per process: (clients) -> (shards, test rows)
_DATA: dict[int, tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]] = {}
#: filled in the driver by the strategy's metric aggregation, one dict per round
ROUNDS: list[dict[str, Any]] = []


def data(clients: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """The clients' shards of the training rows and the test rows (cached per process)."""
    if clients not in _DATA:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.25, stratify=y, random_state=0
        )
        order = np.random.default_rng(0).permutation(len(x_train))
        shards = [(x_train[i], y_train[i]) for i in np.array_split(order, clients)]
        _DATA[clients] = (shards, (x_test, y_test))
    return _DATA[clients]


def local_epoch(
    w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of mini-batch SGD on softmax regression's mean cross-entropy."""
    w, b = w.copy(), b.copy()
    order = rng.permutation(len(x))
    for start in range(0, len(x), BATCH):
        i = order[start : start + BATCH]
        xb, yb = x[i], y[i]
        logits = xb @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(i)), yb] -= 1.0
        p /= len(i)
        w -= LR * (xb.T @ p)
        b -= LR * p.sum(axis=0)
    return w, b


def accuracy(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(((x @ w + b).argmax(axis=1) == y).mean())


def build(clients: int, rounds: int) -> tuple[Any, Any]:
    """The ServerApp and the ClientApp."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        started = time.time()
        pid = int(context.node_config["partition-id"])
        shards, _ = data(int(context.node_config["num-partitions"]))
        x, y = shards[pid]
        w, b = msg.content["arrays"].to_numpy_ndarrays()
        server_round = int(msg.content["config"]["server-round"])
        rng = np.random.default_rng([pid, server_round])
        t0 = time.perf_counter()
        w, b = local_epoch(w, b, x, y, rng)
        compute = time.perf_counter() - t0
        metrics = MetricRecord(
            {"num-examples": len(x), "compute-s": compute, "start": started, "end": time.time()}
        )
        content = RecordDict({"arrays": ArrayRecord([w, b]), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    def keep_metrics(records: list[RecordDict], weighted_by: str) -> MetricRecord:
        """The strategy's train-metric aggregation: keeps each client's, in the driver."""
        rows = [next(iter(r.metric_records.values())) for r in records]
        compute = [float(m["compute-s"]) for m in rows]
        ROUNDS.append({
            "aggregated": time.time(),
            "clients": len(rows),
            "compute_s": compute,
            "first_start": min(float(m["start"]) for m in rows),
        })  # fmt: skip
        return MetricRecord({"compute-s": float(np.mean(compute))})

    server_app = ServerApp()
    accuracies: list[float] = []

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        rng = np.random.default_rng(0)
        w = rng.uniform(-1 / 8, 1 / 8, (64, 10)).astype(np.float32)
        b = rng.uniform(-1 / 8, 1 / 8, 10).astype(np.float32)
        _, (x_test, y_test) = data(clients)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            acc = accuracy(*arrays.to_numpy_ndarrays(), x_test, y_test)
            accuracies.append(acc)
            return MetricRecord({"accuracy": acc})

        strategy = FedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
            min_available_nodes=clients, train_metrics_aggr_fn=keep_metrics,
        )  # fmt: skip
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord([w, b]), num_rounds=rounds,
            train_config=ConfigRecord({"lr": LR}), evaluate_fn=evaluate,
        )  # fmt: skip

    server_app.accuracies = accuracies  # type: ignore[attr-defined]
    return server_app, client_app


def run(clients: int, rounds: int, cpus: float) -> dict[str, Any]:
    import flwr
    import ray
    from flwr.simulation import run_simulation

    server_app, client_app = build(clients, rounds)
    config = {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}}
    start = time.time()
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=clients,
        backend_config=config,  # type: ignore[arg-type]
    )  # fmt: skip
    wall = time.time() - start
    if len(ROUNDS) != rounds:
        raise RuntimeError(f"{len(ROUNDS)} rounds aggregated of {rounds}")
    first = ROUNDS[0]["first_start"]
    ends = [first] + [r["aggregated"] for r in ROUNDS]
    compute = [c for r in ROUNDS for c in r["compute_s"]]
    return {
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "clients": clients,
        "rounds": rounds,
        "updates": sum(r["clients"] for r in ROUNDS),
        "wall_s": wall,
        "startup_s": first - start,
        "rounds_s": ends[-1] - first,
        "round_s": [b - a for a, b in itertools.pairwise(ends)],
        "compute_ms": 1000 * float(np.mean(compute)),
        "accuracy": server_app.accuracies[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=float, default=1.0, help="num_cpus per ClientApp")
    args = parser.parse_args()
    print(json.dumps(run(args.clients, args.rounds, args.cpus)), flush=True)


if __name__ == "__main__":
    # run the module, not __main__, so that Ray's workers import it (by reference)
    import federated_flower_app

    federated_flower_app.main()
