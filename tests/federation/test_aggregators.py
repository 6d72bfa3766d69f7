"""Aggregators of real clients, checked against FedAvg computed here: every client
trains one full-batch step a round, so its update does not depend on sample order, and
the model the root ends with is known exactly.

- Hierarchical: a root ``corral fl serve`` and two edges (``--parent``), two clients
  each; the root's sample-weighted mean of the sites' means is the mean over every
  client, and the root only ever enrolled the two sites.
- Secure: the aggregator learns only the sum of three clients' masked, quantised
  updates; it equals their plain mean to well within the quantisation bound.
- Buffered (FedBuff): a client with eight times the others' data is a real straggler;
  the server steps on the first two updates in, so stale updates arrive and are
  weighed, and the job ends without ever waiting on the slow one.

The aggregators are processes; the clients are `corral.federation.client.join` in
threads of the test (real sockets, one torch import for all of them).
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


def _job(folder: Path, name: str, clients: int = 2, **strategy) -> Path:
    spec = yaml.safe_load((JOB / "job.yaml").read_text())
    fedavg = {"kind": "fedavg", "clients": clients, "fraction": 1.0, "min_clients": clients}
    spec |= {
        "name": name,
        "entrypoint": f"{ROOT / 'examples' / 'digits.py'}:make_model",
        "strategy": fedavg | strategy,
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


def _fedavg(
    spec: JobSpec, shards: list[tuple[torch.Tensor, torch.Tensor]], *, weighted: bool = True
) -> torch.Tensor:
    """Plain FedAvg over all the clients: each one SGD step on its whole shard; the mean
    weighted by samples, or not (secure aggregation weighs clients the same)."""
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
            share = len(y) / total if weighted else 1 / len(shards)
            mean += share * (-LR * grad)
        w = w + mean
    return w


def _shards(folder: Path, n: int) -> list:
    if not (JOB / "train.parquet").exists():
        subprocess.run([sys.executable, str(JOB / "prepare.py")], check=True)
    frame = pd.read_parquet(JOB / "train.parquet")
    # sizes 1 : 2 : … : n, so a mean weighted by samples and a plain one differ
    cuts = [len(frame) * k * (k + 1) // (n * (n + 1)) for k in range(n + 1)]
    for i in range(n):
        frame.iloc[cuts[i] : cuts[i + 1]].to_parquet(folder / f"client{i}.parquet")
    return [as_source(folder / f"client{i}.parquet", label="digit") for i in range(n)]


def _clients(urls: list[str], spec: JobSpec, sources: list, folder: Path) -> tuple[list, list]:
    """A thread per client, each joined at its own address; the threads, and the rounds
    each trained once it is done."""
    threads, done = [], []

    def client(address: JoinAddress, source, i: int) -> None:
        done.append(join(address, spec, source, base=folder, name=f"c{i}", timeout=60).rounds)

    for i, (url, source) in enumerate(zip(urls, sources, strict=True)):
        args = (JoinAddress.parse(url), source, i)
        threads.append(threading.Thread(target=client, args=args, daemon=True))
        threads[-1].start()
    return threads, done


def _tensors(sources: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(torch.from_numpy(a) for a in s.arrays()) for s in sources]


def _final(folder: Path) -> tuple[torch.Tensor, list[dict]]:
    state = ckpt.load(ckpt.latest(folder))
    return torch.cat([v.reshape(-1) for v in state["model"].values()]), state["history"]


def test_edges_aggregate_their_clients_and_the_root_sees_only_the_sites(tmp_path):
    sources = _shards(tmp_path, 4)
    root_job, site_job = _job(tmp_path, "root"), _job(tmp_path, "site")
    procs = [_serve(root_job, tmp_path / "root", tmp_path / "root.log")]
    try:
        parent = _url(tmp_path / "root.log")
        for e in range(2):
            log = tmp_path / f"edge{e}.log"
            procs.append(_serve(site_job, tmp_path / f"edge{e}", log, "--parent", parent))
        spec = JobSpec.model_validate(yaml.safe_load(site_job.read_text()))
        edges = [_url(tmp_path / f"edge{e}.log") for e in range(2)]
        threads, done = _clients([edges[i // 2] for i in range(4)], spec, sources, tmp_path)
        codes = [p.wait(timeout=180) for p in procs]
        logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
        assert codes == [0, 0, 0], logs
        for t in threads:
            t.join(timeout=30)
        assert sorted(done) == [ROUNDS] * 4
        got, history = _final(tmp_path / "root")
        assert [row["clients_enrolled"] for row in history] == [2.0] * ROUNDS
        expected = _fedavg(spec, _tensors(sources))
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_secure_round_with_real_clients_reveals_only_their_sum(tmp_path):
    sources = _shards(tmp_path, 3)
    job = _job(tmp_path, "secure", clients=3, secure={"clip": 1.0, "bits": 32})
    server = _serve(job, tmp_path / "agg", tmp_path / "agg.log")
    try:
        spec = JobSpec.model_validate(yaml.safe_load(job.read_text()))
        threads, done = _clients([_url(tmp_path / "agg.log")] * 3, spec, sources, tmp_path)
        assert server.wait(timeout=180) == 0, (tmp_path / "agg.log").read_text()
        for t in threads:
            t.join(timeout=30)
        assert sorted(done) == [ROUNDS] * 3
        got, history = _final(tmp_path / "agg")
        assert all(row["clients_reported"] == 3 for row in history)
        # four protocol messages a client a round, the masked update by far the largest
        params = got.numel()
        assert all(params * 4 < row["secagg_bytes_per_client"] < params * 6 for row in history)
        expected = _fedavg(spec, _tensors(sources), weighted=False)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_fedbuff_with_real_clients_steps_without_waiting_for_a_straggler(tmp_path):
    if not (JOB / "train.parquet").exists():
        subprocess.run([sys.executable, str(JOB / "prepare.py")], check=True)
    frame = pd.read_parquet(JOB / "train.parquet")
    cut = [0, len(frame) // 10, len(frame) // 5, len(frame)]  # the last: 8x the others
    for i in range(3):
        frame.iloc[cut[i] : cut[i + 1]].to_parquet(tmp_path / f"client{i}.parquet")
    sources = [as_source(tmp_path / f"client{i}.parquet", label="digit") for i in range(3)]
    fedbuff = {"kind": "fedbuff", "buffer": 2, "concurrency": 3, "local_epochs": 2}
    job = _job(tmp_path, "buffered", clients=3, **fedbuff)
    spec = yaml.safe_load(job.read_text())
    spec["batch_size"], spec["epochs"] = 16, 8
    job.write_text(yaml.safe_dump(spec))
    server = _serve(job, tmp_path / "agg", tmp_path / "agg.log")
    try:
        parsed = JobSpec.model_validate(spec)
        threads, done = _clients([_url(tmp_path / "agg.log")] * 3, parsed, sources, tmp_path)
        assert server.wait(timeout=180) == 0, (tmp_path / "agg.log").read_text()
        for t in threads:
            t.join(timeout=30)
        _, history = _final(tmp_path / "agg")
        assert [row["epoch"] for row in history] == [float(e) for e in range(1, 9)]
        assert all(row["clients_reported"] == 2 for row in history)
        # the straggler's updates come in late: stale, and weighed as such
        assert max(row["staleness_max"] for row in history) >= 1
        # the small clients trained more often than the straggler did
        fast, slow = sorted(done)[-1], sorted(done)[0]
        assert fast > slow, done
        assert history[-1]["val_accuracy"] > 0.7, history[-1]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
