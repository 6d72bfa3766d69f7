"""The corral command, run as a user would: a real subprocess, real files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def corral(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    df = pd.DataFrame({"a": rng.normal(size=300) + 3 * y, "b": rng.normal(size=300), "y": y})
    df.to_parquet(tmp_path / "train.parquet", row_group_size=64)
    (tmp_path / "model.py").write_text(
        textwrap.dedent("""
        import torch
        def make():
            layers = [torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)]
            return torch.nn.Sequential(*layers)
    """)
    )
    (tmp_path / "job.yaml").write_text(
        textwrap.dedent("""
        name: tiny
        entrypoint: model.py:make
        roles: {worker: {count: 2}}
        strategy: {kind: averaging, every: 2}
        data: {path: train.parquet, features: [a, b], label: y}
        optimizer: {name: sgd, lr: 0.1}
        epochs: 2
        batch_size: 16
        checkpoint: {dir: ckpt}
    """)
    )
    return tmp_path


def test_train_a_yaml_job(job_dir):
    out = corral("train", "job.yaml", cwd=job_dir)
    assert out.returncode == 0, out.stderr
    assert "training summary" in out.stderr and "last checkpoint" in out.stderr
    assert (job_dir / "ckpt" / "checkpoint-000002.pt").exists()


def test_train_a_parameter_server_job(job_dir):
    spec = job_dir / "job.yaml"
    spec.write_text(
        spec.read_text()
        .replace(
            "roles: {worker: {count: 2}}",
            "roles: {worker: {count: 2}, server: {cpus: 1, memory: 512m}}",
        )
        .replace(
            "strategy: {kind: averaging, every: 2}",
            "strategy: {kind: ps, mode: ssp, staleness: 1, servers: 2}",
        )
    )
    out = corral("train", "job.yaml", cwd=job_dir)
    assert out.returncode == 0, out.stderr
    assert "staleness_mean" in out.stderr  # the epoch lines carry the servers' metrics


def test_a_bad_spec_is_one_line_and_starts_nothing(job_dir):
    spec = job_dir / "job.yaml"
    spec.write_text(spec.read_text().replace("kind: averaging", "kind: telepathy"))
    out = corral("train", "job.yaml", cwd=job_dir)
    assert out.returncode == 1
    assert "strategy.kind: unknown strategy 'telepathy'" in out.stderr
    assert "Traceback" not in out.stderr and "[worker" not in out.stderr


def test_a_wrong_column_lists_the_columns(job_dir):
    spec = job_dir / "job.yaml"
    spec.write_text(spec.read_text().replace("features: [a, b]", "features: [a, c]"))
    out = corral("train", "job.yaml", cwd=job_dir)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "'c'" in out.stderr and "a, b, y" in out.stderr


SCRIPT = """
import argparse, os
import torch.distributed as dist
parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float)
args = parser.parse_args()
dist.init_process_group("gloo")
print(f"rank={dist.get_rank()} world={dist.get_world_size()} lr={args.lr}")
if os.environ.get("FAIL_ON") == str(dist.get_rank()):
    raise KeyError("missing shard")
"""


def test_run_a_script_with_arguments(tmp_path):
    (tmp_path / "train.py").write_text(SCRIPT)
    out = corral("run", "train.py", "--workers", "2", "--", "--lr", "0.1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "[worker 0] rank=0 world=2 lr=0.1" in out.stderr
    assert "[worker 1] rank=1 world=2 lr=0.1" in out.stderr


def test_a_failing_script_names_the_rank(tmp_path):
    env_script = tmp_path / "fail.py"
    env_script.write_text("import os\nos.environ['FAIL_ON'] = '1'\n" + SCRIPT)
    out = corral("run", "fail.py", "--workers", "2", cwd=tmp_path)
    assert out.returncode == 1
    assert "error: worker 1 raised KeyError: 'missing shard'" in out.stderr
    assert 'fail.py", line' in out.stderr  # the user's own traceback is shown


def test_run_a_missing_script(tmp_path):
    out = corral("run", "nope.py", cwd=tmp_path)
    assert out.returncode == 1 and "script nope.py does not exist" in out.stderr


@pytest.mark.spark
def test_train_a_yaml_job_on_spark(job_dir):
    spec = job_dir / "job.yaml"
    spec.write_text(
        spec.read_text()
        + textwrap.dedent("""
        engine: spark
        spark:
          master: local[2]
          conf: {spark.driver.host: 127.0.0.1, spark.driver.bindAddress: 127.0.0.1,
                 spark.ui.enabled: "false"}
        """)
    )
    out = corral("train", "job.yaml", cwd=job_dir)
    assert out.returncode == 0, out.stderr
    assert "training summary" in out.stderr
    assert "Setting default log level" in out.stderr  # pyspark's own word: a session started
    assert (job_dir / "ckpt" / "checkpoint-000002.pt").exists()
