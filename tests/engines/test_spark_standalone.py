"""The Spark engine on a real standalone cluster: a master and a worker started here on
127.0.0.1 with pyspark's own ``spark-class``, and a driver in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.spark]


DRIVER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from pyspark.sql import SparkSession
    import corral

    def ranks():
        dist.init_process_group("gloo")
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        parent = open(f"/proc/{os.getppid()}/cmdline", "rb").read().replace(b"\\0", b" ")
        dist.destroy_process_group()
        return {"sum": t.item(), "parent": parent.decode()}

    def threads():
        return torch.get_num_threads()

    spark = (SparkSession.builder.master(sys.argv[1]).appName("corral-standalone")
             .config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.ui.enabled", "false")
             .config("spark.executor.memory", "1g").getOrCreate())
    try:
        out = corral.run(ranks, workers=2, engine="spark")
        # a stage-level task profile of 2 CPUs: one such task fits the 2-core worker
        out["threads"] = corral.run(threads, workers=1, cpus_per_worker=2, engine="spark")
        try:
            corral.run(threads, workers=2, cpus_per_worker=2, engine="spark")
        except corral.errors.LaunchError as exc:
            out["too_big"] = str(exc)
        model = torch.nn.Linear(2, 3)
        df = spark.createDataFrame([(1.0, 2.0), (-1.0, 0.5)], ["a", "b"])
        got = [r.prediction for r in corral.spark.model_udf(df, model, ["a", "b"]).collect()]
        want = model(torch.tensor([[1.0, 2.0], [-1.0, 0.5]])).argmax(1).tolist()
        print(json.dumps({**out, "udf_ok": got == want}))
    finally:
        spark.stop()
""")


def test_run_and_model_udf_on_a_standalone_cluster(spark_cluster, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    done = subprocess.run(
        [sys.executable, str(script), spark_cluster],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["sum"] == 3.0 and out["udf_ok"]
    assert out["threads"] == 2
    assert "2 worker tasks need 2 CPU(s) and 0 GPU(s) each; Spark fits 1 at once" in (
        out.get("too_big", "")
    )
    assert "pyspark" in out["parent"]  # each rank ran under an executor's Python worker
