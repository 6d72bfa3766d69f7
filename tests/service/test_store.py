"""The store's contract, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from corral.runtime.resources import Resources
from corral.service.resources import Quota
from corral.service.store import Store, StoreError, hash_token


def test_users_get_a_token_that_is_stored_only_hashed(store):
    store.create_team("vision")
    user, token = store.create_user("ada", "vision", admin=True)
    assert token.startswith("crl_") and len(token) > 40
    assert store.user_by_token(token) == user
    assert store.user_by_token(token + "x") is None
    with store.engine.connect() as db:
        stored = db.exec_driver_sql("SELECT token_hash FROM users").scalar()
    assert stored == hash_token(token) and token not in stored


def test_names_are_unique_and_teams_must_exist(store):
    store.create_team("vision")
    with pytest.raises(StoreError, match="team 'vision' already exists"):
        store.create_team("vision")
    with pytest.raises(StoreError, match="no team 'nlp'"):
        store.create_user("bob", "nlp")
    store.create_user("bob", "vision")
    with pytest.raises(StoreError, match="user 'bob' already exists"):
        store.create_user("bob", "vision")


def test_quotas_are_set_and_replaced(store):
    store.create_team("vision")
    store.set_quota("vision", Quota(gpus=4))
    store.set_quota("vision", Quota(cpus=16, gpus=2))
    assert store.quotas() == {"vision": Quota(cpus=16, memory_mib=None, gpus=2)}


def _user(store):
    store.create_team("vision")
    return store.create_user("ada", "vision")[0]


def test_a_job_moves_only_from_the_state_expected(store):
    user = _user(store)
    job, new = store.add_job(
        user=user, name="digits", spec={"a": 1}, demand=Resources(cpus=2, memory_mib=512)
    )
    assert new and job.state == "queued" and job.team == "vision"
    assert store.transition(job.id, ["queued"], "running", "launched", pid=123, started=1.0)
    assert not store.transition(job.id, ["queued"], "running", "launched twice")
    assert store.transition(job.id, ["running"], "succeeded", "exit code 0")
    done = store.job(job.id)
    assert done.state == "succeeded" and done.pid == 123 and done.ended is not None
    assert [(e.state, e.reason) for e in store.events(job.id)] == [
        ("queued", "submitted"),
        ("running", "launched"),
        ("succeeded", "exit code 0"),
    ]
    assert not store.request_cancel(job.id)  # it had ended


def test_a_retried_submission_is_stored_once(store):
    user = _user(store)
    first, new = store.add_job(user=user, name="a", spec={}, demand=Resources(), client_key="k1")
    again, again_new = store.add_job(
        user=user, name="a", spec={}, demand=Resources(), client_key="k1"
    )
    assert new and not again_new and again.id == first.id
    assert store.count_jobs() == 1


def test_concurrent_submissions_are_each_stored_exactly_once(store_url):
    stores = [Store(store_url) for _ in range(2)]  # two connections pools, as two replicas
    user = _user(stores[0])

    def submit(s: Store, start: int) -> None:
        for i in range(start, start + 25):
            s.add_job(user=user, name=f"j{i}", spec={}, demand=Resources(), client_key=f"k{i}")
            s.add_job(user=user, name=f"j{i}", spec={}, demand=Resources(), client_key=f"k{i}")

    threads = [threading.Thread(target=submit, args=(stores[i % 2], 25 * i)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    names = sorted(j.name for j in stores[0].jobs())
    assert names == sorted(f"j{i}" for i in range(100))
    for s in stores:
        s.close()


def test_logs_page_by_cursor_and_metrics_keep_their_order(store):
    user = _user(store)
    job, _ = store.add_job(user=user, name="a", spec={}, demand=Resources())
    rows = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    store.copy_output(job.id, ["one", "two", "three"], rows, log_offset=14, metrics_offset=40)
    page = store.logs(job.id, limit=2)
    assert page.lines == ["one", "two"]
    rest = store.logs(job.id, after=page.next)
    assert rest.lines == ["three"] and store.logs(job.id, after=rest.next).lines == []
    assert store.tail(job.id, 2) == ["two", "three"]
    assert [m["epoch"] for m in store.metrics(job.id)] == [1, 2]
    # the offsets moved with the lines, in the same transaction
    copied = store.job(job.id)
    assert (copied.log_offset, copied.metrics_offset) == (14, 40)


def test_a_jobs_spent_restarts_are_summed_from_its_events(store):
    user = _user(store)
    job, _ = store.add_job(user=user, name="a", spec={}, demand=Resources(), max_restarts=5)
    assert store.restarts_spent(job.id) == 0
    store.transition(job.id, ["queued"], "running", "launched")
    store.transition(job.id, ["running"], "restarting", "died", spent=3)  # 2 inside, 1 here
    store.transition(job.id, ["restarting"], "running", "restarted")
    store.transition(job.id, ["running"], "queued", "preempted")  # spends none
    assert store.restarts_spent(job.id) == 3
    assert [e.restarts for e in store.events(job.id)] == [0, 0, 3, 0, 0]


def test_jobs_are_listed_by_team_state_and_user(store):
    user = _user(store)
    store.create_team("nlp")
    other, _ = store.create_user("bob", "nlp")
    mine, _ = store.add_job(user=user, name="a", spec={}, demand=Resources())
    store.add_job(user=other, name="b", spec={}, demand=Resources())
    store.transition(mine.id, ["queued"], "cancelled", "cancelled by ada")
    assert [j.name for j in store.jobs(team="vision")] == ["a"]
    assert [j.name for j in store.jobs(states=["queued"])] == ["b"]
    assert [j.name for j in store.jobs(user="bob")] == ["b"]


def _old_database(store_url: str, revision: str, *statements: str) -> None:
    """A database left at an older `revision`, with a team, a user and `statements` run."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from corral.service import store as store_module

    engine = store_module._engine(store_url)
    config = Config()
    config.set_main_option(
        "script_location", str(Path(store_module.__file__).parent / "migrations")
    )
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        connection.execute(text("INSERT INTO teams VALUES ('vision', 0)"))
        connection.execute(text("INSERT INTO users VALUES ('ada', 'vision', false, 'h', 0)"))
        for statement in statements:
            connection.execute(text(statement))
    engine.dispose()


_OLD_JOB = (
    'INSERT INTO jobs (id, name, "user", team, state, priority, spec, cpus,'
    " memory_mib, gpus, attempts, max_restarts, submitted, reason,"
    " cancel_requested) VALUES ('abc', 'old', 'ada', 'vision', 'running', 0, '{}',"
    " 1, 512, 0, 2, 2, 1.0, 'restarted', false)"
)


def test_a_database_of_the_first_schema_is_migrated_with_its_jobs(store_url):
    _old_database(store_url, "0001", _OLD_JOB)
    migrated = Store(store_url)  # opening brings the schema to the newest revision
    old = migrated.job("abc")
    assert old.name == "old" and old.preemptible is False and old.expected_runtime is None
    migrated.close()


def test_restarts_counted_from_reasons_before_0003_become_spent_restarts(store_url):
    events = [
        ("queued", "submitted"),
        ("running", "launched"),
        ("restarting", "its process was gone after the server restarted; restarting"),
        ("running", "restarted"),
        ("restarting", "attempt 2 failed (killed); restarting from its last checkpoint"),
        ("running", "restarted"),
    ]
    _old_database(
        store_url,
        "0002",
        _OLD_JOB,
        *(
            f"INSERT INTO events (job, at, state, reason) VALUES ('abc', {i}, '{s}', '{r}')"
            for i, (s, r) in enumerate(events)
        ),
    )
    migrated = Store(store_url)
    # only the job's own failure spent one: the server's restart did not
    assert migrated.restarts_spent("abc") == 1
    old = migrated.job("abc")
    assert (old.log_offset, old.metrics_offset) == (0, 0)
    migrated.close()
