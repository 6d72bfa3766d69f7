"""The service on a real Spark standalone cluster: its pool is the cluster's capacity, and
each job runs as a Spark application of its own, its workers as barrier tasks."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
from conftest import job_spec, start_server, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.spark]

LOOPBACK = [
    "--spark-conf", "spark.driver.host=127.0.0.1",
    "--spark-conf", "spark.driver.bindAddress=127.0.0.1",
    "--spark-conf", "spark.ui.enabled=false",
    "--spark-conf", "spark.executor.memory=1g",
]  # fmt: skip


def test_a_job_runs_as_a_spark_application_on_the_cluster(spark_cluster, tmp_path):
    server, url, admin = start_server(tmp_path, "--spark-master", spark_cluster, *LOOPBACK)
    try:
        assert "pool: 2 CPUs, 1024 MiB" in server.banner  # the 2-core, 1g-executor worker
        assert f"jobs run on Spark at {spark_cluster}" in server.banner
        auth = {"Authorization": f"Bearer {admin}"}
        spec = job_spec(tmp_path, epochs=1, roles={"worker": {"count": 2, "memory": "256m"}})
        made = httpx.post(f"{url}/api/jobs", json={"spec": spec}, headers=auth, timeout=30)
        assert made.status_code == 201, made.text
        job_id = made.json()["id"]

        def job():
            return httpx.get(f"{url}/api/jobs/{job_id}", headers=auth, timeout=30).json()

        wait_until(lambda: job()["state"] in ("succeeded", "failed"), 180, "the job to end")
        lines = httpx.get(f"{url}/api/jobs/{job_id}/logs", headers=auth, timeout=30).json()
        assert job()["state"] == "succeeded", lines["lines"][-30:]
        # each worker ran under an executor's Python worker, and said so in the job's log
        ranks = [line for line in lines["lines"] if "parent:" in line and "pyspark" in line]
        assert any(line.startswith("[worker 0]") for line in ranks), lines["lines"][-30:]
        assert any(line.startswith("[worker 1]") for line in ranks), lines["lines"][-30:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
