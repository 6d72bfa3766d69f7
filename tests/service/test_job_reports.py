"""What a service job's process writes down from its reports: each epoch once across
attempts, each restart as it is spent, and a stop only at an epoch saved after it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from corral.comm.control import Message
from corral.service import job


def _report(**metrics: object) -> Message:
    return Message(
        role="worker", rank=0, body={"kind": "report", "time": time.time(), "metrics": metrics}
    )


def _epochs(folder: Path) -> list[int]:
    lines = (folder / job.METRICS).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line != CUT]
    return [int(r["epoch"]) for r in rows if r["kind"] == "epoch"]


CUT = '{"kind": "epo'  # a line a kill cut short


def test_epochs_an_earlier_attempt_recorded_are_not_recorded_again(tmp_path):
    first = job._report_to(tmp_path, checkpoint_every=1)
    for epoch in (1, 2):
        first(_report(kind="epoch", epoch=epoch, epochs=4, loss=0.5))
    with (tmp_path / job.METRICS).open("a") as out:
        out.write(CUT)
    second = job._report_to(tmp_path, checkpoint_every=1)  # the next attempt restores 3
    for epoch in (1, 2, 3):
        second(_report(kind="epoch", epoch=epoch, epochs=4, loss=0.5, restored=True))
    second(_report(kind="epoch", epoch=4, epochs=4, loss=0.5))
    assert _epochs(tmp_path) == [1, 2, 3, 4]


def test_each_restart_is_written_down_as_it_is_spent(tmp_path):
    report = job._report_to(tmp_path, checkpoint_every=1)
    assert job.restarts_spent(tmp_path) == 0
    for spent in (1, 2):
        report(
            Message(
                role="driver",
                rank=0,
                body={"kind": "report", "metrics": {"kind": "restart", "restarts": spent}},
            )
        )
        assert job.restarts_spent(tmp_path) == spent


def test_a_stop_is_taken_at_a_new_epoch_only(tmp_path):
    report = job._report_to(tmp_path, checkpoint_every=1)
    (tmp_path / job.PREEMPT).touch()
    report(_report(kind="epoch", epoch=1, epochs=4, loss=0.5, restored=True))
    with pytest.raises(job._Preempted, match="epoch 2"):
        report(_report(kind="epoch", epoch=2, epochs=4, loss=0.5))
