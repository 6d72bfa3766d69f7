"""Hierarchical aggregation with real processes on 127.0.0.1: a root ``corral fl serve``
and two edges (``--parent``), each edge with two clients of its own. Every client
trains one full-batch step a round, so its update does not depend on sample order, and
the root's model after two rounds must equal plain FedAvg over the four clients,
computed here: the root's sample-weighted mean of the sites' means is the mean over
every client, and the root only ever enrolled the two sites.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import wait_until

from corral.data import as_source
from corral.federation.client import join
from corral.federation.wire import JoinAddress
from corral.runtime import checkpoint as ckpt
from corral.spec import JobSpec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "examples" / "digits_job"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LR, ROUNDS = 0.5, 2


def _job(folder: Path, name: str) -> Path:
    spec = yaml.safe_load((JOB / "job.yaml").read_text())
    spec |= {
        "name": name,
        "entrypoint": f"{ROOT / 'examples' / 'digits.py'}:make_model",
        "strategy": {"kind": "fedavg", "clients": 2, "fraction": 1.0, "min_clients": 2},
        "federation": {"round_timeout": 60, "wait": 60},
        "optimizer": {"name": "sgd", "lr": LR},
        "epochs": ROUNDS,
        "batch_size": 4096,  # a client's whole shard: one step a round, in any order
    }
    spec["data"]["path"] = str(folder / "client0.parquet")
    spec["validation"]["path"] = str(JOB / "test.parquet")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _serve(job: Path, folder: Path, log: Path, *more: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "corral", "fl", "serve", str(job), "--folder", str(folder)]
    return subprocess.Popen(
        [*command, *more], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=ENV
    )


def _url(log: Path) -> str:
    wait_until(lambda: "join with" in log.read_text(), 60, f"the address in {log.name}")
    found = re.search(r"corral://\S+?(?=')", log.read_text())
    assert found is not None
    return found.group(0)


def _fedavg(spec: JobSpec, shards: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Plain FedAvg over all the clients: each one SGD step on its whole shard."""
    from corral.jobs import parts_for
    from corral.train.loop import build_model

    make, loss, _ = parts_for(spec, base=ROOT)
    torch.manual_seed(spec.seed)
    model = build_model(make)
    params = list(model.parameters())
    w = torch.nn.utils.parameters_to_vector(params).detach()
    total = sum(len(y) for _, y in shards)
    for _ in range(ROUNDS):
        mean = torch.zeros_like(w)
        for x, y in shards:
            torch.nn.utils.vector_to_parameters(w, params)
            model.zero_grad()
            loss(model(x), y).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in params])
            mean += len(y) / total * (-LR * grad)
        w = w + mean
    return w


def test_edges_aggregate_their_clients_and_the_root_sees_only_the_sites(tmp_path):
    if not (JOB / "train.parquet").exists():
        subprocess.run([sys.executable, str(JOB / "prepare.py")], check=True)
    frame = pd.read_parquet(JOB / "train.parquet")
    for i in range(4):
        frame.iloc[i::4].to_parquet(tmp_path / f"client{i}.parquet")
    root_job, site_job = _job(tmp_path, "root"), _job(tmp_path, "site")
    procs = [_serve(root_job, tmp_path / "root", tmp_path / "root.log")]
    threads: list[threading.Thread] = []
    done: list[int] = []
    try:
        parent = _url(tmp_path / "root.log")
        for e in range(2):
            log = tmp_path / f"edge{e}.log"
            procs.append(_serve(site_job, tmp_path / f"edge{e}", log, "--parent", parent))
        spec = JobSpec.model_validate(yaml.safe_load(site_job.read_text()))
        sources = [as_source(tmp_path / f"client{i}.parquet", label="digit") for i in range(4)]
        for i, source in enumerate(sources):
            edge = JoinAddress.parse(_url(tmp_path / f"edge{i // 2}.log"))

            def client(edge: JoinAddress = edge, source=source, i: int = i) -> None:
                joined = join(edge, spec, source, base=tmp_path, name=f"c{i}", timeout=60)
                done.append(joined.rounds)

            threads.append(threading.Thread(target=client, daemon=True))
            threads[-1].start()
        codes = [p.wait(timeout=180) for p in procs]
        logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
        assert codes == [0, 0, 0], logs
        for t in threads:
            t.join(timeout=30)
        assert sorted(done) == [ROUNDS] * 4
        state = ckpt.load(ckpt.latest(tmp_path / "root"))
        assert [row["clients_enrolled"] for row in state["history"]] == [2.0] * ROUNDS
        shards = []
        for source in sources:
            x, y = source.arrays()
            shards.append((torch.from_numpy(x), torch.from_numpy(y)))
        expected = _fedavg(spec, shards)
        got = torch.cat([v.reshape(-1) for v in state["model"].values()])
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
