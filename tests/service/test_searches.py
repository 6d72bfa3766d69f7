"""Searches run by the service, with real job processes: trials are jobs of the
searching user under the team's quota (SQLite and PostgreSQL); the REST routes, with
one team never seeing another's search; the one-line refusals; and ``corral tune``
killed with SIGKILL mid-search and started again, which runs no finished trial twice."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import alive, job_spec, start_server, wait_until
from fastapi.testclient import TestClient

from corral.runtime.resources import Resources
from corral.service.api import create_app
from corral.service.resources import Quota
from corral.service.runner import Runner
from corral.service.searches import Searches, search_detail
from corral.service.store import Store
from corral.service.tuning import search_request

pytestmark = pytest.mark.slow

POOL = Resources(cpus=4, memory_mib=8192)
SPACE = {"optimizer.lr": {"low": 0.01, "high": 0.5, "log": True}}


def settings(**extra):
    return {"name": "lr", "metric": "accuracy", "sampler": "random", "pruner": "none", **extra}


@contextlib.contextmanager
def service(tmp_path, url):
    """A store with team vision (user ada), a runner and the search driver, started."""
    store = Store(url)
    store.create_team("vision")
    user, _ = store.create_user("ada", "vision")
    runner = Runner(store, pool=POOL, state_dir=tmp_path / "state", interval=0.1)
    searches = Searches(store, pool=POOL, interval=0.1)
    runner.start()
    searches.start()
    try:
        yield store, searches, user
    finally:
        searches.stop()
        runner.stop(stop_jobs=True)
        store.close()


def test_trials_are_jobs_of_the_team_and_wait_for_its_quota(tmp_path, store_url):
    """Three trials at once asked, a quota of one CPU: they run one at a time, each a job
    of ada's with the trial's values, and the search still runs all three."""
    with service(tmp_path, store_url) as (store, searches, user):
        store.set_quota("vision", Quota(cpus=1))
        request = search_request(
            job_spec(tmp_path, epochs=2), SPACE, settings(trials=3, concurrency=3)
        )
        made, _ = searches.searches.create(user, searches_request(request))
        wait_until(lambda: searches.searches.get(made.id).final, 240, "the search to end")
        search = searches.searches.get(made.id)
        detail = search_detail(searches.searches, search)
        assert (search.state, len(detail.trial_list)) == ("succeeded", 3), search.reason
        jobs = {j.id: j for j in store.jobs() if j.name.startswith("lr-t")}
        assert len(jobs) == 3
        for trial in detail.trial_list:
            job = jobs[trial.job]
            assert (job.user, job.team, job.state) == ("ada", "vision", "succeeded")
            assert job.spec["optimizer"]["lr"] == trial.params["optimizer.lr"]
            assert trial.epochs == 2 and trial.value == trial.history[-1]
        spans = sorted((j.started, j.ended) for j in jobs.values())
        for (_, ended), (started, _) in itertools.pairwise(spans):
            assert started >= ended, "two trials ran at once beyond the quota"
        best = max(detail.trial_list, key=lambda t: t.value)
        assert detail.best.number == best.number
        assert detail.best_spec["optimizer"]["lr"] == best.params["optimizer.lr"]


def searches_request(body):
    from corral.search.driver import SearchRequest

    return SearchRequest.model_validate(body)


def test_a_trial_that_always_fails_stops_the_search_after_n(tmp_path):
    with service(tmp_path, f"sqlite:///{tmp_path / 'db'}") as (store, searches, user):
        spec = job_spec(tmp_path)
        spec["entrypoint"] = spec["entrypoint"].replace(":make", ":broken")
        request = search_request(spec, SPACE, settings(trials=8, concurrency=1, max_failures=2))
        made, _ = searches.searches.create(user, searches_request(request))
        wait_until(lambda: searches.searches.get(made.id).final, 120, "the search to end")
        search = searches.searches.get(made.id)
        assert search.state == "failed"
        assert search.reason.startswith("the last 2 trials failed; the last one: ")
        assert "this model cannot be built" in search.reason
        assert len(store.jobs()) == 2


@pytest.fixture
def api(tmp_path):
    """The app over a store with teams vision (ada) and audio (bob): a client per user."""
    store = Store(f"sqlite:///{tmp_path / 'db'}")
    clients = {}
    app = create_app(store, pool=POOL)
    for team, name in (("vision", "ada"), ("audio", "bob")):
        store.create_team(team)
        _, token = store.create_user(name, team)
        clients[name] = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    yield clients, store
    store.close()


def test_one_team_never_sees_another_teams_search(api, tmp_path):
    clients, _ = api
    body = search_request(job_spec(tmp_path), SPACE, settings(trials=2))
    made = clients["ada"].post("/api/searches", json=body)
    assert made.status_code == 201, made.text
    search_id = made.json()["id"]
    again = clients["ada"].post("/api/searches", json=body)  # the same search: attached
    assert (again.status_code, again.json()["id"]) == (201, search_id)
    assert [s["id"] for s in clients["ada"].get("/api/searches").json()] == [search_id]
    assert clients["bob"].get("/api/searches").json() == []
    for call in (
        lambda c: c.get(f"/api/searches/{search_id}"),
        lambda c: c.post(f"/api/searches/{search_id}/cancel"),
    ):
        answer = call(clients["bob"])
        assert answer.status_code == 404 and answer.json()["detail"] == (f"no search '{search_id}'")
    other = {**body, "settings": {**body["settings"], "trials": 5}}
    taken = clients["ada"].post("/api/searches", json=other)
    assert taken.status_code == 409 and "give this one another name" in taken.json()["detail"]


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"space": {"optimizer.lrr": {"low": 0.1, "high": 1}}}, "did you mean 'lr'"),
        ({"space": {"optimizer.lr": {"low": 0.5, "high": 0.1}}}, "empty range"),
        ({"settings": {"sampler": "grid"}}, "grid search needs choices, or a step"),
        ({"spec_data": "/nowhere.parquet"}, "data.path: no such file"),
        ({"spec_roles": {"worker": {"count": 9}}}, "refused: "),
    ],
)
def test_a_search_that_cannot_run_is_a_422_and_nothing_starts(api, tmp_path, change, detail):
    clients, _store = api
    body = search_request(job_spec(tmp_path), SPACE, settings())
    body = {**body, **{k: v for k, v in change.items() if not k.startswith("spec_")}}
    if "settings" in change:
        body["settings"] = {**settings(), **change["settings"]}
    if "spec_data" in change:
        data = {**body["spec"]["data"], "path": change["spec_data"]}
        body["spec"] = {**body["spec"], "data": data}
    if "spec_roles" in change:
        body["spec"] = {**body["spec"], "roles": change["spec_roles"]}
    answer = clients["ada"].post("/api/searches", json=body)
    assert answer.status_code == 422
    assert detail in str(answer.json()["detail"])
    assert clients["ada"].get("/api/searches").json() == []


def _tune(tmp_path: Path, job: Path, space: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "corral", "tune", str(job), "--space", str(space)]
    command += ["--trials", "3", "--concurrency", "1", "--metric", "accuracy"]
    command += ["--sampler", "random", "--pruner", "none", "--folder", str(tmp_path / "tune")]
    return subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_tune_killed_mid_search_continues_where_it_was(tmp_path):
    """SIGKILL ``corral tune`` while its second trial runs; the same command again
    re-attaches to that trial's job (it runs in a session of its own), runs trial 0
    never again, and ends with the three trials asked for."""
    hold = tmp_path / "hold"
    spec = job_spec(tmp_path, epochs=3)
    model = Path(spec["entrypoint"].rsplit(":", 1)[0])
    model.write_text(
        model.read_text()
        + textwrap.dedent(f"""
        def held():
            import os, time
            while os.path.exists({str(hold)!r}):
                time.sleep(0.05)
            return make()
        """)
    )
    spec["entrypoint"] = f"{model}:held"
    job, space = tmp_path / "job.yaml", tmp_path / "space.yaml"
    job.write_text(yaml.safe_dump(spec))
    space.write_text(yaml.safe_dump(SPACE))
    db = tmp_path / "tune" / "tune.db"

    def query(sql: str, *args: object) -> list[tuple]:
        """Read the tuner's store as it runs (plain SQLite: opening a `Store` would race
        the tuner's own first migration)."""
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=10)) as con:
                return con.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # not made yet
            return []

    def trial_jobs() -> list[tuple]:
        return query("SELECT id, name, state, attempts, pid, ended FROM jobs ORDER BY name")

    def reattached(job: str) -> bool:
        reasons = query("SELECT reason FROM events WHERE job = ?", job)
        return any("re-attached" in r for (r,) in reasons)

    first = _tune(tmp_path, job, space)
    try:
        wait_until(lambda: [j[2] for j in trial_jobs()][:1] == ["succeeded"], 120, "trial 0 to end")
        hold.touch()  # trial 1 now waits in its model factory
        wait_until(
            lambda: len(trial_jobs()) == 2 and trial_jobs()[1][2] == "running",
            60,
            "trial 1 to run",
        )
        wait_until(lambda: trial_jobs()[1][4] is not None, 30, "trial 1's pid")
        done_before = trial_jobs()[0]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        held, pid = trial_jobs()[1][0], trial_jobs()[1][4]
        assert pid is not None and alive(pid)  # the trial outlived the tuner

        second = _tune(tmp_path, job, space)
        wait_until(
            lambda: reattached(held),
            60,
            "the restarted tuner to re-attach to trial 1",
        )
        hold.unlink()
        out, _ = second.communicate(timeout=180)
        assert second.returncode == 0, out
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    jobs = trial_jobs()
    assert [j[1] for j in jobs] == ["search-t0", "search-t1", "search-t2"]
    assert all(j[2] == "succeeded" and j[3] == 1 for j in jobs), jobs  # one attempt each
    assert jobs[0] == done_before  # trial 0 as it was: not run again
    assert "3 of 3 trials" in out and (tmp_path / "search-best.yaml").exists()
    done = [line for line in out.splitlines() if re.match(r"trial \d complete", line)]
    lrs = {line.split("optimizer.lr=")[1] for line in done}
    assert len(done) == 3 and len(lrs) == 3, "the restarted sampler drew a value again"
    best = yaml.safe_load((tmp_path / "search-best.yaml").read_text())
    assert best["name"] == "search-best" and "lr" in best["optimizer"]


def test_a_tracked_search_is_a_parent_run_with_a_child_per_trial(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go beside its store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {**job_spec(tmp_path, epochs=2), "tracking": {"uri": uri, "experiment": "lr"}}
    with service(tmp_path, f"sqlite:///{tmp_path / 'db'}") as (_, searches, user):
        request = search_request(spec, SPACE, settings(trials=2, concurrency=2))
        made, _ = searches.searches.create(user, searches_request(request))
        wait_until(lambda: searches.searches.get(made.id).final, 240, "the search to end")
        assert searches.searches.get(made.id).state == "succeeded"
        detail = search_detail(searches.searches, searches.searches.get(made.id))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lr").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("corral.search") == made.id]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["lr-t0", "lr-t1"]
    assert parent.info.status == "FINISHED"
    history = client.get_metric_history(parent.info.run_id, "trial_accuracy")
    assert sorted(m.step for m in history) == [0, 1]  # each trial once
    best = detail.best
    assert parent.data.params["best.trial"] == str(best.number)
    assert float(parent.data.params["best.optimizer.lr"]) == best.params["optimizer.lr"]
    assert parent.data.metrics["best_accuracy"] == best.value
    for child in children:  # the trial's own job run: its spec as params, its epochs
        assert "optimizer.lr" in child.data.params and "accuracy" in child.data.metrics


def test_pbt_trials_go_on_from_each_others_checkpoints(tmp_path):
    """A population of two, judged every epoch: the laggard's successor is a job that
    starts from the leader's checkpoint, its first epochs the leader's own."""
    spec = job_spec(tmp_path, epochs=3)
    model = Path(spec["entrypoint"].rsplit(":", 1)[0])
    go = tmp_path / "go"
    # the founders wait for each other (a trial that ends before the other reports is
    # never judged), then take about half a second an epoch, so the driver sees each one
    model.write_text(
        model.read_text().replace(
            "return self.net(x)",
            f"open(os.path.join({str(tmp_path)!r}, f'arrived-{{os.getpid()}}'), 'w').close()\n"
            f"        while not os.path.exists({str(go)!r}):\n"
            "            time.sleep(0.02)\n"
            "        time.sleep(0.07)\n"
            "        return self.net(x)",
        )
    )
    pbt = {"population": 2, "interval": 1, "quantile": 0.5}
    with service(tmp_path, f"sqlite:///{tmp_path / 'db'}") as (store, searches, user):
        searches.job_folder = lambda job: tmp_path / "state" / "jobs" / job
        searches.kept = tmp_path / "state" / "searches"
        request = search_request(spec, SPACE, settings(trials=4, pbt=pbt))
        made, _ = searches.searches.create(user, searches_request(request))
        arrived = lambda: len(list(tmp_path.glob("arrived-*")))  # noqa: E731
        wait_until(lambda: arrived() >= 2, 120, "both founders to train")
        go.touch()
        wait_until(lambda: searches.searches.get(made.id).final, 240, "the search to end")
        search = searches.searches.get(made.id)
        assert search.state == "succeeded", search.reason
        detail = search_detail(searches.searches, search)
        assert 2 < len(detail.trial_list) <= 4  # the budget caps the exploits
        successors = [t for t in detail.trial_list if store.job(t.job).spec.get("resume_from")]
        assert successors, [(t.state, t.reason) for t in detail.trial_list]
        for trial in successors:
            kept = Path(store.job(trial.job).spec["resume_from"])
            assert kept.parent == tmp_path / "state" / "searches" / made.id
            source = next(t for t in detail.trial_list if kept.name.startswith(t.job))
            epochs = [m for m in store.metrics(trial.job) if m.get("kind") == "epoch"]
            restored = [m for m in epochs if m.get("restored")]
            assert restored, "the successor did not start from the checkpoint"
            assert [m["accuracy"] for m in restored] == source.history[: len(restored)]
        exploited = [t for t in detail.trial_list if t.state == "pruned"]
        assert len(exploited) == len(successors)


def test_a_search_on_a_real_server_through_the_cli(tmp_path):
    """``corral tune --server``: trials are jobs of the logged-in user on the server."""
    proc, url, token = start_server(tmp_path)
    env = {**os.environ, "CORRAL_CONFIG": str(tmp_path / "credentials.json")}
    try:
        login = [sys.executable, "-m", "corral", "login", url, "--token", token]
        subprocess.run(login, env=env, check=True, capture_output=True, text=True)
        job, space = tmp_path / "job.yaml", tmp_path / "space.yaml"
        job.write_text(yaml.safe_dump(job_spec(tmp_path, epochs=2)))
        space.write_text(yaml.safe_dump(SPACE))
        command = [sys.executable, "-m", "corral", "tune", str(job), "--space", str(space)]
        command += ["--server", "--trials", "2", "--metric", "accuracy", "--pruner", "none"]
        done = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 of 2 trials" in done.stdout
        listed = httpx.get(
            f"{url}/api/jobs",
            params={"all_states": True},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        assert sorted(j["name"] for j in listed) == ["search-t0", "search-t1"]
        assert {j["user"] for j in listed} == {"admin"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
