"""The Spark engine on a real local[2] session: barrier tasks, failures, slots, servers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import DieOnceLoss, blobs, server_pid

import corral
from corral.engines.base import Plan, ProcessSpec
from corral.engines.spark import SparkEngine
from corral.errors import DataError, LaunchError, SpecError, WorkerError

pytestmark = [pytest.mark.slow, pytest.mark.spark]


def sum_of_ranks() -> dict:
    """A plain torch.distributed function; also says whether a Spark task started it."""
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    dist.destroy_process_group()
    return {"sum": t.item(), "parent": parent}


def test_run_starts_every_rank_as_a_barrier_task(spark):
    out = corral.run(sum_of_ranks, workers=2, engine="spark")  # the active session
    assert out["sum"] == 3.0
    assert "pyspark" in out["parent"]  # its parent is a Spark Python worker


def where_am_i() -> dict:
    local = f"local rank {os.environ['LOCAL_RANK']} of {os.environ['LOCAL_WORLD_SIZE']}"
    print(f"hello from rank {os.environ['RANK']}, {local}")
    return {"payload": sys.argv[-1], "host": os.environ["CORRAL_HOST"]}


def test_tasks_get_the_payload_shipped_and_stream_their_output_to_the_driver(spark, capsys):
    out = corral.run(where_am_i, workers=2, engine=SparkEngine(spark))
    # the payload is a copy in the task's own folder, not a path only the driver has
    assert "/corral-task-" in out["payload"]
    assert out["host"] == "127.0.0.1"  # its executor's address (all on loopback here)
    # printed by the driver itself (capsys sees only this process's sys.stderr, not the
    # executors' output, which local mode also sends to this terminal)
    err = capsys.readouterr().err
    # both tasks on 127.0.0.1: numbered on that host, as torchrun numbers them
    assert "[worker 0] hello from rank 0, local rank 0 of 2" in err
    assert "[worker 1] hello from rank 1, local rank 1 of 2" in err


def test_tasks_number_their_processes_per_host_whatever_the_plan_says(spark):
    show = "import os; print(os.environ['LOCAL_RANK'], os.environ['LOCAL_WORLD_SIZE'])"
    # ranks 6 and 7 of 8 workers, numbered by the launcher as if on one host; both of
    # these tasks are on 127.0.0.1, so they are that host's processes 0 and 1 of 2
    specs = [
        ProcessSpec(
            role="worker",
            rank=r,
            argv=[sys.executable, "-c", show],
            env={"LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "8"},
        )
        for r in (6, 7)
    ]
    group = SparkEngine(spark).launch(Plan(processes=specs))
    try:
        assert sorted(e.returncode for e in group.wait(timeout=60)) == [0, 0]
        assert [group.logs("worker", r) for r in (6, 7)] == ["0 2", "1 2"]
    finally:
        group.stop()


def fail_on_rank_one() -> None:
    if int(os.environ["RANK"]) == 1:
        raise ValueError("rank one cannot go on")
    dist.init_process_group("gloo")
    dist.barrier()  # rank 0 waits here for a peer that never comes


def test_a_failing_rank_fails_the_run_and_cancels_the_stage(spark):
    with pytest.raises(WorkerError, match="worker 1 raised ValueError: rank one cannot go on"):
        corral.run(fail_on_rank_one, workers=2, engine=SparkEngine(spark))
    assert spark.sparkContext.statusTracker().getActiveJobsIds() == []


def test_more_processes_than_task_slots_fail_at_once(spark):
    with pytest.raises(LaunchError, match=r"needs 3 task slots at once \(3 worker\).* has 2"):
        corral.run(sum_of_ranks, workers=3, engine=SparkEngine(spark))


def test_gpus_in_local_mode_are_refused_with_the_fix(spark):
    with pytest.raises(LaunchError, match="Spark's local mode cannot hand GPUs to tasks"):
        corral.run(sum_of_ranks, workers=1, gpus_per_worker=1, engine=SparkEngine(spark))


def parent_of(pid: int) -> tuple[int, str]:
    """The parent of process `pid`: its pid and command line."""
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return ppid, Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


class NoteServerParent(torch.nn.Module):
    """Cross-entropy with which worker 0, at its first step, writes down server 0's parent
    and its own to `path`."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path, self.noted = str(path), False

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.noted:
            self.noted = True
            server = parent_of(server_pid(0))
            Path(self.path).write_text(json.dumps({"server": server, "worker": os.getppid()}))
        return torch.nn.functional.cross_entropy(out, y)


def test_parameter_servers_run_as_tasks_of_the_same_stage(spark, tmp_path):
    noted = tmp_path / "parents.json"
    trainer = corral.Trainer(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ),
        loss=NoteServerParent(noted),
        strategy=corral.ParameterServer(mode="async", servers=1, optimizer_args={"lr": 0.2}),
        workers=1,
        epochs=3,
        batch_size=16,
        checkpoint_dir=tmp_path,
        engine=SparkEngine(spark),
    )
    result = trainer.fit(blobs(300), validation=blobs(100, seed=1), on_report=None)
    assert result.metrics["val_accuracy"] > 0.9
    parents = json.loads(noted.read_text())
    (server_parent, command), worker_parent = parents["server"], parents["worker"]
    assert "pyspark" in command  # the server's parent is a Spark Python worker: a task
    assert server_parent not in (worker_parent, os.getpid())  # its own, not the driver


def test_an_unknown_engine_is_named():
    with pytest.raises(SpecError, match="engine: unknown engine 'yarn'; allowed: 'local', 'spark'"):
        corral.run(sum_of_ranks, workers=1, engine="yarn")


def test_a_killed_task_restarts_the_stage_from_the_checkpoint(spark, tmp_path, caplog):
    trainer = corral.Trainer(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ),
        loss=DieOnceLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        workers=2,
        epochs=3,
        batch_size=16,
        max_restarts=1,
        checkpoint_dir=tmp_path,
        engine="spark",
    )
    result = trainer.fit(blobs(300), on_report=None)
    assert "worker 1 failed (was killed by SIGKILL); restarting" in caplog.text
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert spark.sparkContext.statusTracker().getActiveJobsIds() == []


def blobs_frame(spark, n: int, partitions: int):
    x, y = blobs(n)
    rows = [(float(a), float(b), int(c)) for (a, b), c in zip(x, y, strict=True)]
    return spark.createDataFrame(rows, ["a", "b", "y"]).repartition(partitions)


@pytest.mark.parametrize("partitions", [5, 2], ids=["repartitioned", "as-it-is"])
def test_a_dataframe_trains_where_it_lies(spark, tmp_path, partitions):
    import pandas as pd

    df = blobs_frame(spark, 400, partitions=partitions)
    x, y = blobs(200, seed=1)
    held_out = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": y})
    trainer = corral.Trainer(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ),
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        strategy=corral.AllReduce(),
        workers=2,
        epochs=3,
        batch_size=16,
        checkpoint_dir=tmp_path,
        engine="spark",
    )
    result = trainer.fit(df, features=["a", "b"], label="y", validation=held_out, on_report=None)
    assert [r["samples"] for r in result.history] == [400, 400, 400]  # every row, each epoch
    assert result.metrics["val_accuracy"] > 0.9
    assert result.features == ["a", "b"]


def test_a_vector_column_trains_and_scores(spark, tmp_path):
    from pyspark.ml.linalg import Vectors

    def frame(n: int, seed: int = 0):
        x, y = blobs(n, seed=seed)
        rows = [
            (Vectors.dense(a.tolist()), [float(a[1])], int(c)) for a, c in zip(x, y, strict=True)
        ]
        return spark.createDataFrame(rows, ["vec", "extra", "y"])

    trainer = corral.Trainer(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ),
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        workers=2,
        epochs=3,
        batch_size=16,
        checkpoint_dir=tmp_path,
        engine="spark",
    )
    # an ML vector column and an array column: 2 + 1 inputs
    result = trainer.fit(
        frame(400),
        features=["vec", "extra"],
        label="y",
        validation=frame(200, seed=1),
        on_report=None,
    )
    assert result.metrics["val_accuracy"] > 0.9
    assert (result.features, result.width) == (["vec", "extra"], 3)
    scored = result.model_udf(frame(200, seed=1)).toPandas()
    assert (scored["prediction"] == scored["y"]).mean() > 0.9

    only_vec = corral.Trainer(
        model=lambda: torch.nn.Linear(2, 3),
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        workers=2,
        checkpoint_dir=tmp_path,
        engine="spark",
    ).fit(frame(100), features="vec", label="y", on_report=None)
    assert (only_vec.features, only_vec.width) == (["vec"], 2)


def test_bad_dataframes_fail_before_any_task_starts(spark, tmp_path):
    def fit(df, engine="spark"):
        trainer = corral.Trainer(
            model=lambda: torch.nn.Linear(2, 3),
            loss=torch.nn.CrossEntropyLoss(),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            workers=2,
            checkpoint_dir=tmp_path,
            engine=engine,
        )
        return trainer.fit(df, label="y", on_report=None)

    with pytest.raises(DataError, match=r"column\(s\) b \(string\) are not numeric"):
        fit(spark.createDataFrame([(1.0, "x", 0)], ["a", "b", "y"]))
    with pytest.raises(DataError, match="label column y has 1 null value"):
        fit(spark.createDataFrame([(1.0, 2.0, 0), (1.0, 2.0, None)], "a double, b double, y int"))
    with pytest.raises(
        DataError, match=r"feature column\(s\) with null or NaN values in 2 rows: b \(1\)"
    ):
        fit(spark.createDataFrame([(1.0, 2.0, 0), (1.0, float("nan"), 1)], ["a", "b", "y"]))
    with pytest.raises(DataError, match="feature column v holds arrays of different lengths"):
        fit(spark.createDataFrame([([1.0, 2.0], 0), ([1.0], 1)], ["v", "y"]))
    with pytest.raises(DataError, match="the DataFrame has no rows"):
        fit(spark.createDataFrame([], "a double, b double, y int"))
    with pytest.raises(SpecError, match="a Spark DataFrame trains on engine='spark'"):
        fit(blobs_frame(spark, 10, 1), engine="local")


def fails_in_workers() -> torch.nn.Module:
    if "RANK" in os.environ:  # built once on the driver first, where it must work
        raise RuntimeError("no model on the executors today")
    return torch.nn.Linear(2, 3)


def test_a_worker_dying_before_it_reads_its_partition_fails_the_fit_not_hangs(spark, tmp_path):
    trainer = corral.Trainer(
        model=fails_in_workers,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        workers=2,
        checkpoint_dir=tmp_path,
        engine="spark",
    )
    with pytest.raises(WorkerError, match="no model on the executors today"):
        trainer.fit(blobs_frame(spark, 100, 2), features=["a", "b"], label="y", on_report=None)
    assert spark.sparkContext.statusTracker().getActiveJobsIds() == []


def test_federated_clients_are_made_of_the_rows_each_executor_holds(spark, tmp_path):
    """FedAvg on a DataFrame: each worker splits its own partition into its clients
    (client c on worker c mod 2), trains the sampled ones it holds, and the round's
    all-reduce averages them; the DataFrame never leaves the executors."""
    import pandas as pd
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    frame = pd.DataFrame(x / 16.0, columns=[f"p{i}" for i in range(64)]).assign(digit=y)
    df = spark.createDataFrame(frame.iloc[:1400]).repartition(2)
    trainer = corral.Trainer(
        model=lambda: torch.nn.Linear(64, 10),
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.2),
        strategy=corral.FedAvg(clients=20, fraction=0.5, local_epochs=2),
        workers=2,
        epochs=4,
        batch_size=10,
        checkpoint_dir=tmp_path,
        engine="spark",
    )
    held_out = frame.iloc[1400:]
    result = trainer.fit(df, label="digit", validation=held_out, on_report=None)
    assert [r["clients_reported"] for r in result.history] == [10.0] * 4
    assert result.metrics["val_accuracy"] > 0.85
