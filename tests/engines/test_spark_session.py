"""``engine="spark"`` in a driver with no SparkSession: the engine starts a local one sized
to the job, and a job that succeeds leaves nothing in Spark's log that reads as a failure.

A driver of its own (a subprocess), since the test session's Spark fixture is active in
this one, and the JVM's log goes to the driver's own standard error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.spark]

DRIVER = textwrap.dedent("""
    import json
    import numpy as np, torch
    from pyspark.sql import SparkSession
    import corral

    assert SparkSession.getActiveSession() is None
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = (rng.normal(size=(200, 2)) + 3 * y[:, None]).astype(np.float32)
    trainer = corral.Trainer(
        model=lambda: torch.nn.Linear(2, 2),
        loss=torch.nn.CrossEntropyLoss(),
        strategy=corral.ParameterServer(mode="async", servers=1, optimizer_args={"lr": 0.1}),
        workers=1,
        cpus_per_worker=2,  # and the server's 1: local[3]
        epochs=2,
        batch_size=16,
        engine="spark",
    )
    result = trainer.fit((x, y), on_report=None)
    master = SparkSession.getActiveSession().sparkContext.master
    print(json.dumps({"master": master, "accuracy": result.metrics["accuracy"]}))
""")


def test_a_job_without_a_session_gets_a_local_one_sized_to_it_and_a_quiet_log(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["master"] == "local[3]" and out["accuracy"] > 0.8
    # the server's stage, stopped once the worker is done, ends without killed tasks
    for alarm in ("Lost task", "TaskKilled", "Failed to cancel", " ERROR "):
        assert alarm not in done.stderr, done.stderr[-3000:]
