"""The job model: every bad spec fails at parse time, naming the field and what is allowed."""

from __future__ import annotations

import pytest

from corral.errors import SpecError
from corral.spec import JobSpec, TrainSettings, load_spec, parse
from corral.strategies import Averaging

GOOD = """
name: digits
entrypoint: model.py:make
roles:
  worker: {count: 4, cpus: 2, memory: 2g, gpus: 0}
strategy: {kind: averaging, every: 8}
data: {path: train.parquet, label: y}
epochs: 3
batch_size: 64
max_restarts: 2
checkpoint: {every: 2}
"""


def test_a_good_spec(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(GOOD)
    spec = load_spec(job)
    assert spec.roles.worker.count == 4 and spec.roles.worker.memory == 2048
    assert spec.strategy == Averaging(every=8)
    assert spec.checkpoint.every == 2 and spec.max_restarts == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"strategy": "gossipy"},
            "strategy.kind: unknown strategy 'gossipy'; allowed: 'allreduce', 'averaging'",
        ),
        (
            {"strategy": {"kind": "allreduce", "compression": "zip"}},
            "strategy.compression: Input should be 'fp16' or 'powersgd'",
        ),
        (
            {"roles": {"worker": {"count": 0}}},
            "roles.worker.count: Input should be greater than or equal to 1",
        ),
        ({"roles": {"worker": {"memory": "lots"}}}, "roles.worker.memory: 'lots' is not a size"),
        ({"roles": {"driver": {"count": 1}}}, "roles.driver: unknown field"),
        (
            {"roles": {"server": {"count": 1}}},
            "roles.server: the allreduce strategy runs no servers",
        ),
        ({"epochs": "many"}, "epochs: Input should be a valid integer"),
        ({"batch_sise": 3}, "batch_sise: unknown field"),
        ({"master_port": 70000}, "master_port: Input should be less than or equal to 65535"),
    ],
)
def test_bad_settings_name_the_field(data, message):
    with pytest.raises(SpecError) as info:
        parse(TrainSettings, data)
    assert message in str(info.value)


def test_job_spec_requires_entrypoint_and_data():
    with pytest.raises(SpecError) as info:
        parse(JobSpec, {})
    assert "entrypoint: required" in str(info.value) and "data: required" in str(info.value)


def test_loss_must_be_known_or_a_reference():
    base = {"entrypoint": "m:f", "data": {"path": "x", "label": "y"}}
    with pytest.raises(
        SpecError, match=r"loss: 'hinge' is not cross_entropy, .* or a 'module:attribute'"
    ):
        parse(JobSpec, base | {"loss": "hinge"})
    assert parse(JobSpec, base | {"loss": "mylosses:Focal"}).loss == "mylosses:Focal"


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(SpecError, match="is not valid YAML"):
        load_spec(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="must hold a mapping"):
        load_spec(bad)


def test_optimizer_spec_builds_torch_optimizers():
    import torch

    from corral.spec import OptimizerSpec

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(OptimizerSpec(name="adamw", lr=0.1)(params), torch.optim.AdamW)
    sgd = OptimizerSpec(name="sgd", lr=0.2, momentum=0.9)(params)
    assert sgd.defaults["momentum"] == 0.9
