"""The search driver's decisions, against a scripted host (pure policy: the service's
own trials are tested with real jobs in tests/service/test_searches.py), on Optuna's
journal storage in a file, so that a driver made again on it is a restarted search."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from corral.search.driver import Driver, SearchSettings, TrialStatus, make_study
from corral.search.space import Space

JOB = {"entrypoint": "m:f", "data": {"path": "x", "label": "y"}, "epochs": 9}
SPACE = Space.of({"optimizer.lr": {"low": 0.001, "high": 1.0, "log": True}})


class Host:
    """Jobs that report one epoch per look: ``val_accuracy`` = lr × epoch (so a higher
    lr is better), or a failure, as scripted."""

    def __init__(self, *, fail: bool = False, metric: str = "val_accuracy") -> None:
        self.jobs: dict[str, dict] = {}
        self.submits: dict[int, int] = {}
        self.stopped: dict[str, str] = {}
        self.fail, self.metric = fail, metric
        self.most_running = 0

    def submit(self, number, spec):
        self.submits[number] = self.submits.get(number, 0) + 1
        job = f"job-{number}"
        self.jobs.setdefault(job, {"lr": spec["optimizer"]["lr"], "epoch": 0, "state": "running"})
        return job

    def status(self, job):
        found = self.jobs[job]
        if found["state"] == "running":
            if self.fail:
                found["state"] = "failed"
            else:
                found["epoch"] += 1
                if found["epoch"] == JOB["epochs"]:
                    found["state"] = "succeeded"
        running = sum(j["state"] == "running" for j in self.jobs.values())
        self.most_running = max(self.most_running, running)
        rows = [
            {"kind": "epoch", "epoch": e, "epochs": 9, "loss": 1.0, self.metric: found["lr"] * e}
            for e in range(1, found["epoch"] + 1)
        ]
        state = {"cancelled": "stopped"}.get(found["state"], found["state"])
        return TrialStatus(state, rows, "boom" if found["state"] == "failed" else "")

    def stop(self, job, reason):
        self.jobs[job]["state"] = "cancelled"
        self.stopped[job] = reason


def driver(tmp_path: Path, host: Host, **settings) -> Driver:
    defaults = {"trials": 12, "concurrency": 3, "sampler": "random", "pruner": "asha"}
    search = SearchSettings(**{**defaults, **settings})
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    study = make_study(search, SPACE, storage)
    return Driver(study, spec=JOB, space=SPACE, settings=search, host=host)


def run(d: Driver, steps: int = 500):
    for _ in range(steps):
        outcome = d.step()
        if outcome is not None:
            return outcome
    pytest.fail("the search did not end")


def test_asha_stops_the_laggards_and_the_search_ends_at_its_budget(tmp_path):
    host = Host()
    d = driver(tmp_path, host)
    outcome = run(d)
    trials = d.study.get_trials()
    states = [t.state for t in trials]
    assert outcome.state == "succeeded"
    assert len(trials) == 12
    assert host.most_running <= 3
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, states
    for t in pruned:  # stopped at once, with its reason, having run fewer epochs
        assert host.stopped[f"job-{t.number}"].startswith("pruned at epoch")
        assert max(t.intermediate_values) < 9
    best = d.study.best_trial
    assert best.params["optimizer.lr"] == max(
        t.params["optimizer.lr"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE
    )


def test_a_driver_made_again_on_the_journal_continues_the_same_search(tmp_path):
    host = Host()
    first = driver(tmp_path, host)
    for _ in range(8):
        assert first.step() is None
    done_before = {t.number for t in first.study.get_trials() if t.state.is_finished()}
    assert done_before
    # the crash: the next driver knows only the journal; the jobs go on in the host
    again = driver(tmp_path, host)
    outcome = run(again)
    assert outcome.state == "succeeded"
    assert len(again.study.get_trials()) == 12
    assert all(count == 1 for count in host.submits.values()), host.submits


def test_a_trial_asked_for_but_not_noted_is_submitted_once(tmp_path):
    """The driver stopped between submitting a trial's job and noting its id: the next
    one submits it again under the same number, and the host answers the same job."""
    host = Host()
    d = driver(tmp_path, host, trials=2, concurrency=1)
    trial = d.study.ask()
    lr = SPACE.suggest(trial)["optimizer.lr"]
    host.submit(trial.number, {"optimizer": {"lr": lr}})  # and then the crash
    outcome = run(driver(tmp_path, host, trials=2, concurrency=1))
    assert outcome.state == "succeeded"
    assert host.submits == {0: 2, 1: 1}  # trial 0 asked twice of the host, one job
    assert len(host.jobs) == 2


def test_trials_that_always_fail_stop_the_search_saying_why(tmp_path):
    host = Host(fail=True)
    d = driver(tmp_path, host, concurrency=1, max_failures=3)
    outcome = run(d)
    assert outcome.state == "failed"
    assert outcome.reason == "the last 3 trials failed; the last one: boom"
    assert len(d.study.get_trials()) == 3


def test_a_metric_the_job_never_reports_fails_the_search(tmp_path):
    host = Host(metric="accuracy")
    outcome = run(driver(tmp_path, host, pruner="none"))
    assert outcome.state == "failed"
    assert "metric 'val_accuracy' is not reported; the job reports loss, accuracy" in (
        outcome.reason
    )
    assert "(val_* need validation data)" in outcome.reason
    assert set(host.stopped) == set(host.jobs)  # its running trials were stopped
