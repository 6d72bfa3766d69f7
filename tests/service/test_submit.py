"""What the service refuses at submit because the job would fail as it starts: data that
is not there, paths it cannot resolve, and a checkpoint folder of the spec's own (the
service keeps each job's checkpoints). Each is a 422 that names the field, and nothing
is queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from corral.runtime.resources import Resources
from corral.service.api import create_app
from corral.service.store import Store


@pytest.fixture
def submit(tmp_path: Path) -> Iterator[Any]:
    """POST a spec as a user of team vision: returns the response and the job count."""
    pd.DataFrame({"a": [0.0, 1.0], "y": [0, 1]}).to_parquet(tmp_path / "train.parquet")
    store = Store(f"sqlite:///{tmp_path / 'db'}")
    store.create_team("vision")
    _, token = store.create_user("ada", "vision")
    client = TestClient(create_app(store, pool=Resources(cpus=2, memory_mib=4096)))

    def post(**fields: Any) -> tuple[int, str, int]:
        spec = {
            "entrypoint": "examples.digits:make_model",
            "data": {"path": str(tmp_path / "train.parquet"), "label": "y"},
            **fields,
        }
        r = client.post(
            "/api/jobs", json={"spec": spec}, headers={"Authorization": f"Bearer {token}"}
        )
        return r.status_code, r.json().get("detail", ""), store.count_jobs()

    yield post
    store.close()


def test_a_job_whose_files_are_there_is_queued(submit, tmp_path: Path) -> None:
    valid = {"path": str(tmp_path / "train.parquet"), "features": ["a"], "label": "y"}
    assert submit(validation=valid)[0] == 201


@pytest.mark.parametrize(
    ("field", "value", "detail"),
    [
        ("data", {"path": "/nowhere/train.parquet", "label": "y"}, "data.path: no such file"),
        ("validation", {"path": "/nowhere/v.parquet", "label": "y"}, "validation.path: no such"),
        ("data", {"path": "train.parquet", "label": "y"}, "data.path: train.parquet is relative"),
        ("resume_from", "/nowhere/checkpoints", "resume_from: /nowhere/checkpoints does not"),
    ],
)
def test_a_path_the_job_would_not_find_is_a_422_naming_it(submit, field, value, detail):
    code, said, queued = submit(**{field: value})
    assert (code, queued) == (422, 0), said
    assert said.startswith(detail) and "\n" not in said


def test_data_without_the_columns_asked_for_is_a_422(submit, tmp_path: Path) -> None:
    data = {"path": str(tmp_path / "train.parquet"), "features": ["b"], "label": "y"}
    code, said, queued = submit(data=data)
    assert (code, queued) == (422, 0)
    assert said.startswith("data.path: ") and "'b'" in said, said


def test_a_checkpoint_dir_in_the_spec_is_a_422_saying_the_service_keeps_them(submit):
    code, said, queued = submit(checkpoint={"dir": "/tmp/mine"})
    assert (code, queued) == (422, 0)
    assert said == "checkpoint.dir: the service keeps each job's checkpoints; leave it out"
