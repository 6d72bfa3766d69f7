"""A federated job with real clients as a job of a real ``corral server``: submitted and
scheduled like any job, its process is the aggregator; the join address (with its
enrolment token) is shown to the job's team only, in the API and on the job page; two
clients (`corral fl join`'s function, in threads of the test) train it to the end, and
its rounds are its epochs.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from conftest import start_server, wait_until

from corral.data import as_source
from corral.errors import SpecError
from corral.federation.client import join
from corral.federation.wire import JoinAddress
from corral.spec import JobSpec, parse_job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "examples" / "digits_job"


def _spec(folder: Path) -> dict:
    if not (JOB / "train.parquet").exists():
        subprocess.run([sys.executable, str(JOB / "prepare.py")], check=True)
    frame = pd.read_parquet(JOB / "train.parquet")
    for i in range(2):
        frame.iloc[i::2].to_parquet(folder / f"client{i}.parquet")
    spec = yaml.safe_load((JOB / "job.yaml").read_text())
    spec |= {
        "name": "fl-digits",
        "entrypoint": f"{ROOT / 'examples' / 'digits.py'}:make_model",
        "strategy": {"kind": "fedavg", "clients": 2, "fraction": 1.0, "min_clients": 2},
        "federation": {"round_timeout": 30, "wait": 60},
        "epochs": 3,
        "batch_size": 32,
    }
    # the clients' data: not on the server (a submit does not ask for it)
    spec["data"]["path"] = str(folder / "elsewhere.parquet")
    spec["validation"]["path"] = str(JOB / "test.parquet")
    return spec


def _client(url: str, spec: dict, data: Path, done: list[int]) -> threading.Thread:
    """A client as `corral fl join` runs it, in a thread (real sockets, no torch import
    of its own); the rounds it trained go to `done`."""
    job = JobSpec.model_validate(spec)
    source = as_source(data, label=job.data.label)

    def train() -> None:
        address = JoinAddress.parse(url)
        done.append(join(address, job, source, base=data.parent, timeout=60).rounds)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return thread


def test_real_clients_train_a_submitted_job_whose_address_only_its_team_sees(tmp_path):
    spec = _spec(tmp_path)
    proc, url, admin = start_server(tmp_path, "--cpus", "2")
    try:
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"})
        tokens = {}
        for team, user in (("vision", "ada"), ("speech", "bob")):
            api.post("/api/admin/teams", json={"name": team}).raise_for_status()
            made = api.post("/api/admin/users", json={"name": user, "team": team})
            tokens[user] = made.raise_for_status().json()["token"]
        ada = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['ada']}"})
        bob = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['bob']}"})
        job_id = ada.post("/api/jobs", json={"spec": spec}).raise_for_status().json()["id"]
        # one process, the aggregator, whatever the worker count
        assert ada.get(f"/api/jobs/{job_id}").json()["demand"]["cpus"] == 1

        wait_until(lambda: ada.get(f"/api/jobs/{job_id}/join").status_code == 200, 60, "join")
        joining = ada.get(f"/api/jobs/{job_id}/join").json()
        token = joining["url"].split("token=")[1]
        assert joining["command"].startswith(f"corral fl join '{joining['url']}'")
        assert bob.get(f"/api/jobs/{job_id}/join").status_code == 404
        page = httpx.get(f"{url}/jobs/{job_id}", cookies={"corral_token": tokens["ada"]})
        assert "corral fl join" in page.text and token in page.text
        other = httpx.get(f"{url}/jobs/{job_id}", cookies={"corral_token": tokens["bob"]})
        assert other.status_code == 404 and token not in other.text

        done: list[int] = []
        clients = [
            _client(joining["url"], spec, tmp_path / f"client{i}.parquet", done) for i in range(2)
        ]
        wait_until(
            lambda: ada.get(f"/api/jobs/{job_id}").json()["state"] in ("succeeded", "failed"),
            120,
            "the federated job to end",
        )
        detail = ada.get(f"/api/jobs/{job_id}").json()
        logs = ada.get(f"/api/jobs/{job_id}/logs").json()["lines"]
        assert detail["state"] == "succeeded", logs
        rounds = [m for m in detail["metrics"] if m.get("kind") == "epoch"]
        assert [r["epoch"] for r in rounds] == [1, 2, 3]
        assert all(r["clients_reported"] == 2 for r in rounds)
        assert rounds[-1]["val_accuracy"] > 0.8
        for c in clients:
            c.join(timeout=60)
        assert done == [3, 3]
        assert not any(token in line for line in logs)  # the token is never logged
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_federation_names_a_federated_strategy(tmp_path):
    spec = _spec(tmp_path)
    with pytest.raises(SpecError, match="federation: real clients train a federated"):
        parse_job({**spec, "strategy": "allreduce"}, source="job.yaml")
