"""The corral command, run as a user would: a real subprocess, real files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def corral(
    *args: str, cwd: Path, command: tuple[str, ...] = (sys.executable, "-m", "corral")
) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, in a terminal 80 columns wide."""
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def fits_80_columns(text: str) -> bool:
    """Every line fits, and a long one goes on indented under itself (a line that rich
    or the terminal broke for width starts at column 0)."""
    lines = text.splitlines()
    return all(len(line) <= 80 for line in lines) and all(
        line.startswith(" ") for line in lines[1:]
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
    # 150 rows per worker in batches of 16: the bar ends on its steps, not "done"
    assert "step 10/10" in out.stderr and "step done" not in out.stderr
    # the summary has every column, none squeezed to "…", in 80 columns
    table = out.stderr[out.stderr.index("training summary") :].splitlines()
    header = table[1].split()
    columns = "epoch loss accuracy samples samples/s syncs time s workers"
    assert header == columns.split()
    assert "…" not in out.stderr and max(len(line) for line in table) <= 80


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
    text = spec.read_text().replace("kind: averaging", "kind: telepathy")
    spec.write_text(text.replace("epochs: 2", "epoch: 2"))
    out = corral("train", "job.yaml", cwd=job_dir)
    assert out.returncode == 1
    assert "strategy.kind: unknown strategy 'telepathy'" in out.stderr
    assert "epoch: unknown field; did you mean 'epochs'?" in out.stderr
    assert "Traceback" not in out.stderr and "[worker" not in out.stderr
    assert fits_80_columns(out.stderr), out.stderr


HEAVY = ("corral.jobs", "corral.data", "pandas", "pyarrow", "pyspark")


def imported(job_dir: Path) -> set[str]:
    """The modules ``corral train`` imports for a job whose spec is invalid."""
    spec = job_dir / "job.yaml"
    spec.write_text(spec.read_text().replace("epochs: 2", "epochs: 0"))
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "corral", "train", "job.yaml"],
        cwd=job_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "epochs: Input should be greater than" in out.stderr
    return {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if "|" in line}


def test_a_bad_spec_fails_before_the_training_stack_loads(job_dir):
    modules = imported(job_dir)
    assert "corral.spec" in modules
    assert not [m for m in modules if any(m == h or m.startswith(f"{h}.") for h in HEAVY)]


def test_a_bad_spec_fails_before_torch_loads(job_dir):
    assert "torch" not in imported(job_dir)


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


def test_run_a_function_of_a_module_in_the_current_folder(tmp_path):
    (tmp_path / "train.py").write_text(
        "import os\ndef main():\n    return 'main ran on rank ' + os.environ['RANK']\n"
    )
    # the installed command, as a user types it: unlike `python -m corral`, its own folder
    # (not the current one) comes first on its import path
    command = (str(Path(sys.executable).with_name("corral")),)
    out = corral("run", "train:main", "--workers", "2", cwd=tmp_path, command=command)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "main ran on rank 0"  # workers import it by name too


@pytest.mark.spark
def test_train_a_yaml_job_on_spark(job_dir):
    spec = job_dir / "job.yaml"
    spec.write_text(
        spec.read_text()
        # a server beside the worker: a stage the job stops once the worker is done
        .replace("roles: {worker: {count: 2}}", "roles: {worker: {count: 1}}")
        .replace("kind: averaging, every: 2", "kind: ps, mode: async, servers: 1")
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
    # nothing in Spark's log reads as a failure after a job that succeeded
    for alarm in ("Lost task", "TaskKilled", "Failed to cancel", " ERROR "):
        assert alarm not in out.stderr, out.stderr[-3000:]
