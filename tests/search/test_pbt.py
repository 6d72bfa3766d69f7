"""Population based training's decisions, against a scripted host whose jobs resume
from each other's checkpoints (pure policy; a real PBT search runs in
tests/service/test_searches.py)."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from corral.errors import SpecError
from corral.search.driver import RESUME_ATTR, Pbt, SearchSettings, TrialStatus, check, make_study
from corral.search.pbt import PARENT, explore, make_driver
from corral.search.space import Space

EPOCHS = 8
JOB = {"entrypoint": "m:f", "data": {"path": "x", "label": "y"}, "epochs": EPOCHS}
SPACE = Space.of(
    {
        "optimizer.lr": {"low": 0.01, "high": 1.0, "log": True},
        "batch_size": {"low": 16, "high": 128, "step": 16},
        "optimizer.name": {"choices": ["sgd", "adam"]},
    }
)


class Host:
    """Each look a job trains an epoch: its value grows by its lr. A job that resumes a
    checkpoint starts from that job's epoch and value, and reports its history first."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.copies: dict[str, tuple[str, int]] = {}

    def submit(self, number, spec):
        job = f"job-{number}"
        if job not in self.jobs:
            rows: list[float] = []
            if "resume_from" in spec:
                source, epoch = self.copies[spec["resume_from"]]
                rows = self.jobs[source]["rows"][:epoch]
            self.jobs[job] = {"lr": spec["optimizer"]["lr"], "rows": rows, "state": "running"}
        return job

    def status(self, job):
        found = self.jobs[job]
        if found["state"] == "running":
            last = found["rows"][-1] if found["rows"] else 0.0
            found["rows"].append(last + found["lr"])
            if len(found["rows"]) == EPOCHS:
                found["state"] = "succeeded"
        rows = [
            {"kind": "epoch", "epoch": e + 1, "epochs": EPOCHS, "val_accuracy": v}
            for e, v in enumerate(found["rows"])
        ]
        return TrialStatus({"cancelled": "stopped"}.get(found["state"], found["state"]), rows)

    def stop(self, job, reason):
        self.jobs[job]["state"] = "cancelled"

    def checkpoint(self, job):
        epoch = len(self.jobs[job]["rows"])
        path = f"/kept/{job}-{epoch}.pt"
        self.copies[path] = (job, epoch)
        return path


def run(tmp_path, name="journal", **pbt):
    settings = SearchSettings(
        trials=16, sampler="random", seed=5, pbt=Pbt(population=4, interval=2, **pbt)
    )
    storage = JournalStorage(JournalFileBackend(str(tmp_path / name)))
    study = make_study(settings, SPACE, storage)
    driver = make_driver(study, spec=JOB, space=SPACE, settings=settings, host=Host())
    for _ in range(400):
        outcome = driver.step()
        if outcome is not None:
            return outcome, study, driver.host
    pytest.fail("the search did not end")


def test_laggards_go_on_from_a_leaders_checkpoint_with_its_values_explored(tmp_path):
    outcome, study, host = run(tmp_path)
    assert outcome.state == "succeeded"
    trials = study.get_trials()
    assert len(trials) <= 16
    successors = [t for t in trials if PARENT in t.user_attrs]
    assert successors, "nothing was exploited"
    for trial in successors:
        parent = trials[trial.user_attrs[PARENT]]
        source, epoch = host.copies[trial.system_attrs[RESUME_ATTR]]
        assert source == parent.system_attrs["corral.job"]
        # the successor's history starts with its parent's, up to the checkpoint
        assert [trial.intermediate_values[e] for e in range(1, epoch + 1)] == [
            parent.intermediate_values[e] for e in range(1, epoch + 1)
        ]
        for path, value in trial.params.items():  # explored inside the space
            param = SPACE.root[path]
            if param.choices is None:
                assert param.low <= value <= param.high
    exploited = [t for t in trials if t.user_attrs.get("reason", "").startswith("exploited")]
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in exploited)
    assert len(exploited) == len(successors)
    founders = [t for t in trials if PARENT not in t.user_attrs]
    assert len(founders) == 4
    assert study.best_value >= max(t.value for t in founders if t.value is not None)


def test_the_same_seed_makes_the_same_decisions(tmp_path):
    def lineage(name):
        _, study, _ = run(tmp_path, name)
        return [(t.number, t.user_attrs.get(PARENT), t.params) for t in study.get_trials()]

    assert lineage("a") == lineage("b")


def test_explore_moves_within_the_range_and_snaps_to_the_step():
    rng = random.Random(0)
    pbt = Pbt(perturb=0.5, resample=0.3)
    for _ in range(200):
        out = explore(
            SPACE, {"optimizer.lr": 0.9, "batch_size": 128, "optimizer.name": "sgd"}, pbt, rng
        )
        assert 0.01 <= out["optimizer.lr"] <= 1.0
        assert out["batch_size"] in range(16, 129, 16)
        assert out["optimizer.name"] in ("sgd", "adam")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pruner": "asha"}, "PBT replaces the trials that lag itself; set pruner: none"),
        ({"pbt": {"interval": 8}}, "pbt.interval: 8 epochs leaves no exploit step"),
        ({"trials": 2}, "trials: 2 cannot hold a population of 4"),
        ({"sampler": "grid"}, "PBT draws its first population"),
    ],
)
def test_a_pbt_search_that_cannot_run_says_why(settings, message):
    settings = SearchSettings(**{"pbt": {}, **settings})
    space = Space.of({"batch_size": {"choices": [16, 32]}})
    with pytest.raises(SpecError, match=message):
        check(settings, space, JOB)
