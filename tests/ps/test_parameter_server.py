"""The parameter server on real processes: exactness of sync, every mode trains, keys, errors."""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import blobs, sequential_sgd

import corral
from corral.comm.curve import JobKeys
from corral.errors import CorralError, SpecError
from corral.ps.client import PSClient
from corral.ps.layout import Layout
from corral.ps.server import ADDRESS_KEY, serve
from corral.ps.settings import ServerSettings
from corral.runtime.roles import Role
from corral.spec import parse
from corral.train.launcher import LaunchOptions, launch

pytestmark = pytest.mark.slow


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def fit(strategy: corral.ParameterServer, tmp_path, workers: int = 2, epochs: int = 1, **kw):
    trainer = corral.Trainer(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        strategy=strategy,
        workers=workers,
        epochs=epochs,
        batch_size=16,
        checkpoint_dir=tmp_path,
        **kw,
    )
    return trainer.fit(blobs(256), on_report=None)


def test_sync_equals_sequential_sgd_on_the_concatenated_batch(tmp_path):
    ps = corral.ParameterServer(mode="sync", servers=2, optimizer_args={"lr": 0.2})
    result = fit(ps, tmp_path)
    torch.manual_seed(0)
    reference = sequential_sgd(model(), blobs(256), lr=0.2)
    for ours, theirs in zip(result.model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert result.metrics["staleness_histogram"] == {0: 2 * 8}


@pytest.mark.parametrize(
    "strategy",
    [
        corral.ParameterServer(mode="async", servers=2, lr_scaling="staleness"),
        corral.ParameterServer(mode="ssp", servers=1, staleness=2, optimizer_args={"lr": 0.2}),
        corral.ParameterServer(
            mode="softsync", servers=2, quorum=2, optimizer="adam", optimizer_args={"lr": 0.01}
        ),
    ],
    ids=["async", "ssp", "softsync"],
)
def test_every_mode_trains_and_reports_staleness(tmp_path, strategy):
    result = fit(strategy, tmp_path, epochs=3)
    first, *_, last = result.history
    assert last["loss"] < first["loss"] and last["accuracy"] > 0.75
    assert sum(last["staleness_histogram"].values()) == 3 * 2 * 8  # every gradient counted
    assert last["server_mb_per_s"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "softsync", "quorum": 3}, "strategy.quorum: 3 is more than the 2 workers"),
        ({"mode": "ssp", "quorum": 2}, "strategy.quorum: only mode 'softsync' uses it"),
        ({"mode": "async", "staleness": 2}, "strategy.staleness: only mode 'ssp' uses it"),
        ({"staleness": -1}, "strategy.staleness"),
        ({"servers": 0}, "strategy.servers"),
        ({"mode": "eventual"}, "strategy.mode"),
    ],
)
def test_bad_settings_name_the_value(tmp_path, kwargs, message):
    with pytest.raises(SpecError, match=message):
        fit({"kind": "ps", **kwargs}, tmp_path)


def test_roles_server_must_agree_with_the_strategy():
    with pytest.raises(SpecError, match=r"roles.server.count: 3 differs from the 2 servers"):
        parse(
            corral.TrainSettings,
            {"strategy": {"kind": "ps", "servers": 2}, "roles": {"server": {"count": 3}}},
        )


def server_address() -> str:
    """Inside a worker: where server 0 of this job listens, from the job's store."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        None,
        False,
        timeout=timedelta(seconds=60),
    )
    return store.get(ADDRESS_KEY.format(0)).decode()


def probe_server(keys: JobKeys) -> dict:
    """Inside a worker: talk to server 0 with a rogue key, then with the job's key."""
    address = server_address()
    layout = Layout.split(4, 1)
    rogue_keys = JobKeys.generate()
    # the worst case: the rogue knows the server's public key, but not the client secret
    rogue_keys = JobKeys(
        keys.server_public,
        keys.server_secret[:0] or rogue_keys.server_secret,
        rogue_keys.client_public,
        rogue_keys.client_secret,
    )
    rogue = PSClient([address], rogue_keys, worker=0, handshake_s=2)
    try:
        rogue.init(np.ones(4, dtype=np.float32), layout)
        rogue_result = "answered"
    except CorralError as exc:
        rogue_result = str(exc)
    finally:
        rogue.close()
    legit = PSClient([address], keys, worker=0, handshake_s=30)
    values = legit.init(np.arange(4, dtype=np.float32), layout)
    try:
        legit.step(np.ones(7, dtype=np.float32), Layout.split(7, 1))
        shape_error = ""
    except CorralError as exc:
        shape_error = str(exc)
    legit.close()
    return {"rogue": rogue_result, "values": values.tolist(), "shape_error": shape_error}


def beside_one_server(fn, keys: JobKeys, lr: float):
    """Run `fn(keys)` on one worker beside one async SGD server of the job `keys`."""
    settings = ServerSettings(mode="async", optimizer_args={"lr": lr})
    server = Role(name="server", count=1, fn=serve, args=(settings, 1, keys))
    return launch(fn, (keys,), LaunchOptions(workers=1, helpers=(server,)))


def test_a_process_without_the_job_key_gets_nothing():
    keys = JobKeys.generate()
    out = beside_one_server(probe_server, keys, lr=0.1)
    assert "did not answer within 2 s" in out["rogue"]
    assert out["values"] == [0.0, 1.0, 2.0, 3.0]  # the rogue's init never landed
    assert "gradient of 7 elements for a shard of 4" in out["shape_error"]
    assert repr(keys) == "JobKeys(<hidden>)"


def push_one_step_twice(keys: JobKeys) -> dict:
    """Inside a worker: send the same numbered push twice, as a resend after a restart may."""
    client = PSClient([server_address()], keys, worker=0)
    layout = Layout.split(4, 1)
    client.init(np.zeros(4, dtype=np.float32), layout)
    push = ({"op": "step", "worker": 0, "version": 0, "seq": 1}, [np.ones(4, np.float32)])
    first = client._exchange([push])[0][1][0].tolist()
    again = client._exchange([push])[0][1][0].tolist()
    updates = client.stats()[0]["updates"]
    client.close()
    return {"first": first, "again": again, "updates": updates}


def test_a_resent_push_is_answered_but_applied_once():
    out = beside_one_server(push_one_step_twice, JobKeys.generate(), lr=0.5)
    assert out["first"] == out["again"] == [-0.5] * 4
    assert out["updates"] == 1
