"""LOCAL_RANK, LOCAL_WORLD_SIZE and CUDA_VISIBLE_DEVICES as torchrun sets them.

torchrun shows every process the host's GPUs and numbers processes per host, so the DDP
tutorial's ``torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))`` picks each process's
own GPU. These tests check the environment on a machine without GPUs by handing the local
engine GPU names it cannot use (the workers never touch CUDA), and run real DDP on two
GPUs where a machine has them.
"""

from __future__ import annotations

import os

import pytest
import torch

import corral
from corral.engines.base import ProcessSpec
from corral.engines.local import device_sets
from corral.runtime.resources import Resources


def _environment() -> dict[str, str]:
    keys = ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "CORRAL_DEVICE")
    return {k: os.environ.get(k, "") for k in keys}


def gather_environment() -> list[dict[str, str]]:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    every: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, _environment())
    dist.destroy_process_group()
    return [e for e in every if e is not None]


def test_without_gpus_local_ranks_are_per_host_and_no_gpu_is_shown():
    every = corral.run(gather_environment, workers=3)
    assert [e["LOCAL_RANK"] for e in every] == ["0", "1", "2"]
    assert {e["LOCAL_WORLD_SIZE"] for e in every} == {"3"}
    assert {e["CUDA_VISIBLE_DEVICES"] for e in every} == {""}


def test_each_worker_sees_the_hosts_gpus_and_its_own_at_local_rank(monkeypatch):
    # GPU names the caller may hand out; the workers only read their environment
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b,GPU-c,GPU-d")
    every = corral.run(gather_environment, workers=2, gpus_per_worker=2)
    assert {e["CUDA_VISIBLE_DEVICES"] for e in every} == {"GPU-a,GPU-b,GPU-c,GPU-d"}
    # worker 1's own GPUs are c and d: its first one is index 2 of what it sees
    assert [(e["LOCAL_RANK"], e["CORRAL_DEVICE"]) for e in every] == [("0", "0"), ("1", "2")]


def test_helpers_without_gpus_see_none_beside_gpu_workers():
    specs = [
        ProcessSpec(role="worker", rank=1, argv=[], resources=Resources(cpus=1, gpus=1)),
        ProcessSpec(role="worker", rank=0, argv=[], resources=Resources(cpus=1, gpus=1)),
        ProcessSpec(role="server", rank=0, argv=[], resources=Resources(cpus=1)),
    ]
    assert device_sets(specs, [["7"], ["3"], []]) == [["3", "7"], ["3", "7"], []]


def ddp_on_local_rank() -> list[str]:
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # as in PyTorch's DDP tutorial
    dist.init_process_group("nccl")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1).cuda())
    model(torch.randn(8, 4, device="cuda")).sum().backward()
    names: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, torch.cuda.get_device_properties(0).uuid.hex)
    dist.destroy_process_group()
    return [str(torch.cuda.current_device()), *[n or "" for n in names]]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_the_ddp_tutorial_runs_unchanged_on_two_gpus():
    out = corral.run(ddp_on_local_rank, workers=2, gpus_per_worker=1)
    assert out[0] == "0"  # rank 0 picked device 0 of those it sees
