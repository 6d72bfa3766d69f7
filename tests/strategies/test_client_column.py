"""A client id column as the partition: one client per id, the column never a feature."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import corral
from corral.errors import DataError, SpecError
from corral.federated import ClientColumn
from corral.jobs import trainer_for
from corral.spec import JobSpec, parse

RNG = np.random.default_rng(1)
#: Three users of unequal sizes, their rows interleaved; ids sort as bo < eve < zed.
USERS = RNG.choice(np.array(["zed", "bo", "eve"], dtype=object), size=90, p=[0.2, 0.3, 0.5])
FRAME = pd.DataFrame({"a": RNG.normal(size=90), "b": RNG.normal(size=90), "user": USERS})
FRAME["y"] = (FRAME.a - FRAME.b > 0).astype("int64")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(2, 2)  # two inputs: a and b, not the user column


def _trainer(clients: int = 3, epochs: int = 2) -> corral.Trainer:
    return corral.Trainer(
        model=_model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        strategy=corral.FedAvg(
            clients=clients, fraction=1.0, partition=ClientColumn(column="user")
        ),
        workers=2,
        epochs=epochs,
        batch_size=1000,  # FedSGD: one full-batch step per client and round
    )


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_each_user_is_one_client_and_the_user_column_is_no_feature() -> None:
    result = _trainer().fit(FRAME, label="y", validation=FRAME, on_report=None)
    model = _model()
    x = torch.tensor(FRAME[["a", "b"]].to_numpy(np.float32))
    y = torch.tensor(FRAME.y.to_numpy())
    for _ in range(2):  # FedSGD over the three users, each weighed by its row count
        start, moved = _flat(model), 0.0
        for user in ["bo", "eve", "zed"]:
            rows = torch.from_numpy(np.flatnonzero(FRAME.user.eq(user)))
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            moved = moved + len(rows) * (-0.5 * grad)
        torch.nn.utils.vector_to_parameters(start + moved / len(FRAME), model.parameters())
    assert torch.allclose(_flat(result.model), _flat(model), atol=1e-5)
    assert all(row["clients"] == row["clients_reported"] == 3 for row in result.history)
    assert result.features == ["a", "b"] and "val_loss" in result.history[-1]


def test_a_yaml_job_on_parquet_reads_the_column_as_its_clients(tmp_path: Path) -> None:
    FRAME.to_parquet(tmp_path / "train.parquet")
    (tmp_path / "model.py").write_text(
        textwrap.dedent("""
            import torch

            def make():
                return torch.nn.Linear(2, 2)
        """)
    )
    spec = {
        "entrypoint": "model.py:make",
        "data": {"path": "train.parquet", "label": "y"},
        "validation": {"path": "train.parquet", "label": "y"},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "strategy": {
            "kind": "fedavg",
            "clients": 3,
            "partition": {"kind": "column", "column": "user"},
        },
        "roles": {"worker": {"count": 2}},
        "epochs": 2,
    }
    trainer, train, validation = trainer_for(parse(JobSpec, spec, source="job.yaml"), base=tmp_path)
    assert train.arrays()[0].shape == (90, 2) and validation is not None
    assert validation.arrays()[0].shape == (90, 2)
    result = trainer.fit(train, validation=validation, on_report=None)
    assert [row["clients"] for row in result.history] == [1.0, 1.0]  # 0.1 of 3, at least 1


def test_client_column_errors_are_one_line_each_before_any_worker() -> None:
    with pytest.raises(DataError, match="'user' has 3 distinct values but clients is 4"):
        _trainer(clients=4).fit(FRAME, label="y", on_report=None)
    with pytest.raises(
        DataError, match=r"column\(s\) 'user' not found; the DataFrame has: a, b, y"
    ):
        _trainer().fit(FRAME.drop(columns="user"), label="y", on_report=None)
    with pytest.raises(
        DataError, match=r"'user' has 1 missing \(NaN/None\) values, first at row 4"
    ):
        _trainer().fit(FRAME.assign(user=FRAME.user.where(FRAME.index != 4)), label="y")
    with pytest.raises(
        DataError, match=r"column \('user'\) is read only from a DataFrame or Parquet"
    ):
        _trainer().fit((FRAME[["a", "b"]].to_numpy(), FRAME.y.to_numpy()))
    spark_frame = type("DataFrame", (), {"__module__": "pyspark.sql.dataframe"})()
    with pytest.raises(
        SpecError, match="'user' is read from a pandas DataFrame or Parquet data, not"
    ):
        _trainer().fit(spark_frame, label="y")


def test_a_search_of_the_trainer_writes_the_ids_beside_the_features(tmp_path: Path) -> None:
    from corral.jobs import job_of_trainer

    spec = job_of_trainer(_trainer(), FRAME, folder=tmp_path, label="y", validation=FRAME)
    assert spec["data"]["features"] == spec["validation"]["features"] == ["a", "b"]
    assert list(pd.read_parquet(spec["data"]["path"]).columns) == ["a", "b", "y", "user"]
