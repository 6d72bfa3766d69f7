"""Real clients: ``corral fl serve`` and ``corral fl join`` as separate processes on
127.0.0.1, each client with its own Parquet shard of digits.

One run covers a client killed mid-job (the rounds after close with the others), one a
SIGKILLed aggregator started again (it resumes from its round checkpoint, the clients
enrol again, no round is counted twice); bad addresses, tokens and models get one line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import wait_until

from corral.runtime import checkpoint as ckpt

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "examples" / "digits_job"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
JOIN = (sys.executable, "-m", "corral", "fl", "join")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fl")
    if not (JOB / "train.parquet").exists():
        subprocess.run([sys.executable, str(JOB / "prepare.py")], check=True)
    frame = pd.read_parquet(JOB / "train.parquet")
    for i in range(3):
        frame.iloc[i::3].to_parquet(folder / f"client{i}.parquet")
    return folder


def _job(folder: Path, *, epochs: int = 3, local_epochs: int = 1, hidden: bool = False) -> Path:
    spec = yaml.safe_load((JOB / "job.yaml").read_text())
    spec["entrypoint"] = f"{ROOT / 'examples' / 'digits.py'}:make_model"
    if hidden:  # another model than the job's: the aggregator must refuse it
        (folder / "other.py").write_text(
            "import torch\ndef make_model():\n    return torch.nn.Linear(64, 10)\n"
        )
        spec["entrypoint"] = f"{folder / 'other.py'}:make_model"
    spec["data"]["path"] = str(folder / "client0.parquet")
    spec["validation"]["path"] = str(JOB / "test.parquet")
    spec["strategy"] = {
        "kind": "fedavg",
        "clients": 3,
        "fraction": 1.0,
        "min_clients": 2,
        "local_epochs": local_epochs,
    }
    spec |= {"epochs": epochs, "batch_size": 32}
    path = folder / ("other.yaml" if hidden else "job.yaml")
    path.write_text(yaml.safe_dump(spec))
    return path


def _serve(job: Path, folder: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corral",
            "fl",
            "serve",
            str(job),
            "--folder",
            str(folder),
            "--round-timeout",
            "8",
            "--wait",
            "60",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=ENV,
    )


def _url(log: Path) -> str:
    wait_until(lambda: "join with" in log.read_text(), 60, "the aggregator's address")
    found = re.search(r"corral://\S+?(?=')", log.read_text())
    assert found is not None
    return found.group(0)


def _join(url: str, job: Path, data: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*JOIN, url, "--job", str(job), "--data", str(data), "--name", data.stem, "--timeout=60"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=ENV,
    )


def _rounds(folder: Path) -> int:
    found = ckpt.latest(folder)
    return 0 if found is None else int(ckpt.load(found)["data_position"]["epoch"])


def _finish(*procs: subprocess.Popen[bytes]) -> list[int]:
    try:
        return [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_three_clients_train_and_a_killed_one_leaves_the_rounds_to_the_others(
    shards, tmp_path
) -> None:
    # 20 rounds of 5 local epochs: still training when a client is killed after round 1
    job, agg = _job(tmp_path, epochs=20, local_epochs=5), tmp_path / "agg"
    server = _serve(job, agg, tmp_path / "serve.log")
    url = _url(tmp_path / "serve.log")
    clients = [
        _join(url, job, shards / f"client{i}.parquet", tmp_path / f"c{i}.log") for i in range(3)
    ]
    wait_until(lambda: _rounds(agg) >= 1, 120, "the first round's checkpoint")
    clients[2].kill()
    codes = _finish(server, *clients[:2])
    assert codes == [0, 0, 0], (tmp_path / "serve.log").read_text()
    history = ckpt.load(ckpt.latest(agg))["history"]
    assert [r["epoch"] for r in history] == list(range(1, 21))
    assert history[0]["clients_reported"] == 3
    # the round it was sampled for closed at its timeout with the other two; then it
    # went silent and left the pool
    assert any(r["clients_dropped"] == 1 and r["clients_reported"] == 2 for r in history)
    assert history[-1]["clients_enrolled"] == 2 and history[-1]["clients_reported"] == 2
    assert not any(r.get("round_failed") for r in history)
    assert history[-1]["val_accuracy"] > 0.9
    assert "the job is done" in (tmp_path / "c0.log").read_text()


def test_a_killed_aggregator_resumes_and_its_clients_enrol_again(shards, tmp_path) -> None:
    job, agg, log = _job(tmp_path, epochs=3), tmp_path / "agg", tmp_path / "serve.log"
    server = _serve(job, agg, log)
    url = _url(log)
    clients = [
        _join(url, job, shards / f"client{i}.parquet", tmp_path / f"c{i}.log") for i in range(2)
    ]
    wait_until(lambda: _rounds(agg) >= 1, 120, "the first round's checkpoint")
    server.send_signal(signal.SIGKILL)
    server.wait()
    done = _rounds(agg)
    again = _serve(job, agg, log)  # the same command: same folder, address and token
    codes = _finish(again, *clients)
    assert codes == [0, 0, 0], log.read_text()
    assert f"resuming at round {done + 1}" in log.read_text()
    history = ckpt.load(ckpt.latest(agg))["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]  # each round once
    assert all(r["clients_reported"] == 2 for r in history)


def test_a_wrong_token_another_model_and_a_bad_address_are_one_line_each(shards, tmp_path) -> None:
    job, agg, log = _job(tmp_path, epochs=1), tmp_path / "agg", tmp_path / "serve.log"
    server = _serve(job, agg, log)
    url = _url(log)
    wrong = re.sub(r"token=[^&]+", "token=not-the-token", url)
    other = _job(tmp_path, hidden=True)
    cases = (
        (wrong, job, "refused by the aggregator: wrong enrolment token"),
        (url, other, "refused by the aggregator: its model has 650 parameters, the job's 9610"),
        (
            "corral://127.0.0.1:1/",
            job,
            "no key or token in 'corral://127.0.0.1:1/': copy the whole address",
        ),
    )
    try:
        data = str(shards / "client0.parquet")
        clients = [  # all at once: each only starts, is refused and says so
            subprocess.Popen(
                [*JOIN, target, "--job", str(spec), "--data", data],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
            )
            for target, spec, _ in cases
        ]
        for client, (_, _, expected) in zip(clients, cases, strict=True):
            _, err = client.communicate(timeout=120)
            assert client.returncode == 1
            lines = err.strip().splitlines()
            assert len(lines) == 1 and expected in lines[0], err
    finally:
        server.kill()
        server.wait()
