"""LOCAL_RANK, LOCAL_WORLD_SIZE and the GPUs shown on Spark, numbered per host as torchrun
numbers them, from where a stage's tasks run and the GPUs Spark gave them (a pure function:
no Spark, no GPU needed; tests/engines/test_spark.py checks it in real tasks)."""

from __future__ import annotations

from corral.engines.base import ProcessSpec
from corral.engines.spark import per_host_env
from corral.runtime.resources import Resources


def workers(n: int, gpus: int = 0) -> list[ProcessSpec]:
    return [
        ProcessSpec(role="worker", rank=r, argv=[], resources=Resources(cpus=1, gpus=gpus))
        for r in range(n)
    ]


def test_ranks_are_numbered_per_host_with_uneven_counts_and_no_gpu_shown():
    placed = [("10.0.0.1", []), ("10.0.0.2", []), ("10.0.0.1", []), ("10.0.0.1", [])]
    envs = per_host_env(workers(4), placed)
    assert [(e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) for e in envs] == [
        ("0", "3"),
        ("0", "1"),
        ("1", "3"),
        ("2", "3"),
    ]
    assert not any("CUDA_VISIBLE_DEVICES" in e or "CORRAL_DEVICE" in e for e in envs)


def test_each_task_sees_its_hosts_gpus_and_its_own_at_local_rank():
    placed = [("a", ["0"]), ("b", ["1"]), ("a", ["3"]), ("b", ["0"]), ("a", ["1"])]
    envs = per_host_env(workers(5, gpus=1), placed)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,3,1", "1,0", "0,3,1", "1,0", "0,3,1"]
    # one GPU each: cuda:LOCAL_RANK is the task's own, as the DDP tutorial assumes
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0", "1", "1", "2"]
    assert [e["CORRAL_DEVICE"] for e in envs] == ["0", "0", "1", "1", "2"]


def test_a_task_with_several_gpus_is_told_where_its_own_begin():
    envs = per_host_env(workers(2, gpus=2), [("a", ["0", "1"]), ("a", ["2", "3"])])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1,2,3", "0,1,2,3"]
    assert [(e["LOCAL_RANK"], e["CORRAL_DEVICE"]) for e in envs] == [("0", "0"), ("1", "2")]


def test_roles_of_one_stage_are_numbered_apart():
    servers = [ProcessSpec(role="server", rank=r, argv=[]) for r in range(2)]
    placed = [("a", []), ("a", []), ("a", []), ("b", [])]
    envs = per_host_env([*workers(2), *servers], placed)
    assert [(e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) for e in envs] == [
        ("0", "2"),
        ("1", "2"),
        ("0", "1"),
        ("0", "1"),
    ]
