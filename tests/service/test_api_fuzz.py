"""The REST API under fuzzing (schemathesis, from its own OpenAPI schema) and its auth rules.

The fuzz runs every operation in-process (ASGI) as an admin, on a SQLite store and a pool
with no runner, so nothing launches: no request may answer 5xx, and every documented
response must match its schema. The hand-written tests pin who may see what: every auth
failure is the same 401, a non-admin gets 403 on admin routes, another team's job (and its
checkpoint) is the same 404 as no job, oversize bodies are 413, and a job that can never
run is a 422 with the numbers. Each world has a real Parquet file for its jobs' data,
since a submit opens it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pandas as pd
import pytest
import schemathesis
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error, response_schema_conformance

from corral.runtime import checkpoint as ckpt
from corral.runtime.resources import Resources
from corral.service.api import MAX_BODY, create_app
from corral.service.job import CHECKPOINTS
from corral.service.store import TOKEN_PREFIX, Store

POOL = Resources(cpus=2, memory_mib=4096, gpus=0)
#: The largest integer SQLite (and PostgreSQL's BIGINT) can hold.
INT64_MAX = 2**63 - 1


def _openapi() -> dict[str, Any]:
    """The app's schema. Built at import, because schemathesis' lazy `from_fixture` needs
    pytest's `Node._nodeid`, which pytest 9.2 no longer has; the schema does not depend on
    the store, so an in-memory one serves."""
    store = Store("sqlite://")
    try:
        return create_app(store, pool=POOL).openapi()
    finally:
        store.close()


#: A fixed seed and no config file read from the working directory: the same cases each run.
schema = schemathesis.openapi.from_dict(_openapi(), config=schemathesis.Config(seed=0))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class World:
    """A store with teams ``a`` and ``b`` (a user each) and an admin, and the app on it."""

    store: Store
    app: FastAPI
    client: TestClient
    admin: str
    alice: str  # team a
    bob: str  # team b
    folder: Path  # the data, and the jobs' folders as a runner keeps them

    def job(self, name: str = "job", **fields: Any) -> dict[str, Any]:
        """A spec the API accepts (nothing runs it: there is no runner)."""
        data = {"path": str(self.folder / "train.parquet"), "label": "y"}
        return {"entrypoint": "examples.digits:make_model", "data": data, "name": name, **fields}

    def checkpoints(self, job_id: str) -> Path:
        """Where the app looks for the job's checkpoints."""
        return Path(self.app.state.job_folder(job_id)) / CHECKPOINTS


def make_world(url: str, folder: Path) -> World:
    pd.DataFrame({"a": [0.0, 1.0], "b": [1.0, 0.0], "y": [0, 1]}).to_parquet(
        folder / "train.parquet"
    )
    store = Store(url)
    for team in ("admin", "a", "b"):
        store.create_team(team)
    _, admin = store.create_user("admin", "admin", admin=True)
    _, alice = store.create_user("alice", "a")
    _, bob = store.create_user("bob", "b")
    app = create_app(store, pool=POOL, job_folder=lambda job_id: folder / "jobs" / job_id)
    return World(store, app, TestClient(app), admin, alice, bob, folder)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(f"sqlite:///{tmp_path / 'db'}", tmp_path)
    yield w
    w.store.close()


# -- the fuzz ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, str]]:
    """The world, and a queued job of team ``a``: the fuzz also aims at a job and a team
    that exist, or the routes would stop at their 404 before the store sees anything."""
    folder = tmp_path_factory.mktemp("fuzz")
    w = make_world(f"sqlite:///{folder / 'db'}", folder)
    made = w.client.post("/api/jobs", json={"spec": w.job()}, headers=bearer(w.alice))
    assert made.status_code == 201, made.text
    yield w, made.json()["id"]
    w.store.close()


@pytest.mark.slow
@schema.parametrize()
@hypothesis.settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_no_operation_answers_5xx_and_responses_match_the_schema(case, fuzzed):
    w, job_id = fuzzed
    cases = [case]
    aimed = {k: v for k, v in (("job_id", job_id), ("team", "a")) if k in case.path_parameters}
    if aimed:
        real = case.operation.Case(
            path_parameters={**case.path_parameters, **aimed},
            query=case.query,
            body=case.body,
            media_type=case.media_type,
        )
        cases.append(real)
    for c in cases:
        response = c.call(app=w.app, headers=bearer(w.admin))
        checks = [not_a_server_error, response_schema_conformance]
        c.validate_response(response, checks=checks, headers=bearer(w.admin))


# -- who may call ------------------------------------------------------------------------


def test_every_auth_failure_is_the_same_401(world: World) -> None:
    unknown = TOKEN_PREFIX + secrets.token_urlsafe(32)
    attempts: list[dict[str, Any]] = [
        {},  # no token
        {"headers": {"Authorization": "Bearer"}},
        {"headers": {"Authorization": "Bearer not-a-token"}},  # malformed
        {"headers": {"Authorization": f"Bearer {TOKEN_PREFIX}short"}},  # malformed
        {"headers": {"Authorization": f"Bearer {world.alice}x'; --"}},  # malformed
        {"headers": {"Authorization": f"Basic {world.alice}"}},  # not a bearer token
        {"headers": bearer(unknown)},  # well-formed, unknown
        {"cookies": {"corral_token": unknown}},
    ]
    bodies = set()
    for attempt in attempts:
        client = TestClient(world.app, cookies=attempt.get("cookies"))
        for method, path in (("GET", "/api/me"), ("GET", "/api/jobs"), ("POST", "/api/jobs")):
            r = client.request(
                method, path, headers=attempt.get("headers"), json={"spec": world.job()}
            )
            assert r.status_code == 401, (attempt, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            bodies.add(r.text)
    assert len(bodies) == 1, bodies
    assert world.store.count_jobs() == 0
    assert world.client.get("/api/me", headers=bearer(world.alice)).json() == {
        "name": "alice",
        "team": "a",
        "admin": False,
    }


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/admin/teams", None),
        ("POST", "/api/admin/teams", {"name": "c"}),
        ("GET", "/api/admin/users", None),
        ("POST", "/api/admin/users", {"name": "eve", "team": "a", "admin": True}),
        ("PUT", "/api/admin/quotas/a", {"cpus": 100}),
    ],
)
def test_a_non_admin_on_admin_routes_is_403(world: World, method, path, body) -> None:
    r = world.client.request(method, path, headers=bearer(world.alice), json=body)
    assert r.status_code == 403, r.text
    assert world.store.teams() == ["a", "admin", "b"]
    assert [u.name for u in world.store.users()] == ["admin", "alice", "bob"]
    assert world.store.quotas() == {}


def test_another_teams_job_is_the_same_404_as_no_job(world: World) -> None:
    made = world.client.post("/api/jobs", json={"spec": world.job()}, headers=bearer(world.alice))
    assert made.status_code == 201, made.text
    job_id = made.json()["id"]
    ckpt.save(world.checkpoints(job_id), 1, {"model": {"w": torch.ones(2)}}, keep=1)
    unknown = secrets.token_hex(len(job_id) // 2)  # an id of the same length: same body size
    calls = (("GET", ""), ("GET", "/logs"), ("GET", "/checkpoint"), ("POST", "/cancel"))
    for method, suffix in calls:
        theirs = world.client.request(
            method, f"/api/jobs/{job_id}{suffix}", headers=bearer(world.bob)
        )
        none = world.client.request(
            method, f"/api/jobs/{unknown}{suffix}", headers=bearer(world.bob)
        )
        assert theirs.status_code == none.status_code == 404, (suffix, theirs.text)
        assert theirs.text.replace(job_id, "ID") == none.text.replace(unknown, "ID")
        assert dict(theirs.headers) == dict(none.headers)
    assert world.client.get("/api/jobs", headers=bearer(world.bob)).json() == []
    mine = world.client.get(f"/api/jobs/{job_id}", headers=bearer(world.alice))
    assert mine.status_code == 200 and mine.json()["state"] == "queued"  # bob's cancel did nothing
    model = world.client.get(f"/api/jobs/{job_id}/checkpoint", headers=bearer(world.alice))
    assert model.status_code == 200, model.text
    assert model.content == (world.checkpoints(job_id) / "checkpoint-000001.pt").read_bytes()


def test_a_job_without_a_checkpoint_says_so(world: World) -> None:
    made = world.client.post("/api/jobs", json={"spec": world.job()}, headers=bearer(world.alice))
    job_id = made.json()["id"]
    r = world.client.get(f"/api/jobs/{job_id}/checkpoint", headers=bearer(world.alice))
    assert r.status_code == 404
    assert r.json()["detail"] == f"job '{job_id}' has no checkpoint yet (queued)"


def _oversize(world: World) -> bytes:
    body = json.dumps({"spec": world.job(padding="x" * MAX_BODY)}).encode()
    assert len(body) > MAX_BODY
    return body


def test_an_oversize_body_is_413(world: World) -> None:
    r = world.client.post(
        "/api/jobs",
        content=_oversize(world),
        headers={**bearer(world.alice), "Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text
    assert world.store.count_jobs() == 0


def test_a_streamed_body_without_a_length_is_refused_unread(world: World) -> None:
    body = _oversize(world)
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))  # no Content-Length
    r = world.client.post(
        "/api/jobs",
        content=chunks,
        headers={**bearer(world.alice), "Content-Type": "application/json"},
    )
    assert r.status_code == 411, r.text
    assert world.store.count_jobs() == 0


# -- what is refused at submit ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"epochz": 2}, "epochz: unknown field"),
        ({"roles": {"worker": {"cpu": 2}}}, "roles.worker.cpu: unknown field"),
        ({"roles": {"worker": {"memory": "lots"}}}, "roles.worker.memory: 'lots' is not a size"),
        ({"entrypoint": None}, "entrypoint: required"),
    ],
)
def test_a_wrong_field_is_a_422_naming_it(world: World, fields, named) -> None:
    spec = {k: v for k, v in world.job(**fields).items() if v is not None}
    r = world.client.post("/api/jobs", json={"spec": spec}, headers=bearer(world.alice))
    assert r.status_code == 422, r.text
    assert named in r.json()["detail"]
    assert world.store.count_jobs() == 0


def test_a_wrong_request_field_is_a_422_naming_it(world: World) -> None:
    r = world.client.post(
        "/api/jobs", json={"spec": world.job(), "prio": 3}, headers=bearer(world.alice)
    )
    assert r.status_code == 422, r.text
    assert ["body", "prio"] in [e["loc"] for e in r.json()["detail"]]


@pytest.mark.parametrize(
    ("worker", "numbers"),
    [
        ({"count": 3}, "the job asks for 3 CPUs in all but the pool has 2 CPUs"),
        (
            {"memory": "8g"},
            "the job asks for 8 GiB of memory in all but the pool has 4 GiB of memory",
        ),
        ({"gpus": 1}, "the job asks for 1 GPU in all but the pool has 0 GPUs"),
    ],
)
def test_a_job_bigger_than_the_pool_is_a_422_with_the_numbers(world: World, worker, numbers):
    spec = world.job(roles={"worker": worker})
    r = world.client.post("/api/jobs", json={"spec": spec}, headers=bearer(world.alice))
    assert r.status_code == 422, r.text
    assert numbers in r.json()["detail"]
    assert world.store.count_jobs() == 0


def test_a_job_over_the_teams_quota_is_a_422_naming_the_team(world: World) -> None:
    set_quota = world.client.put(
        "/api/admin/quotas/a", json={"cpus": 1}, headers=bearer(world.admin)
    )
    assert set_quota.status_code == 200, set_quota.text
    spec = world.job(roles={"worker": {"count": 2}})
    r = world.client.post("/api/jobs", json={"spec": spec}, headers=bearer(world.alice))
    assert r.status_code == 422, r.text
    assert "team 'a' may use at most 1 CPU" in r.json()["detail"]
    assert "2 CPUs" in r.json()["detail"]
    ok = world.client.post("/api/jobs", json={"spec": spec}, headers=bearer(world.bob))
    assert ok.status_code == 201, ok.text  # team b has no quota


# -- faults the fuzz found, fixed; kept as tests ------------------------------------------------


def test_a_quota_too_large_for_the_database_is_a_422_not_a_500(world: World) -> None:
    r = world.client.put(
        "/api/admin/quotas/a", json={"gpus": INT64_MAX + 1}, headers=bearer(world.admin)
    )
    assert r.status_code == 422, r.text


def test_a_refused_submit_matches_the_schema(world: World) -> None:
    case = schema["/api/jobs"]["POST"].Case(body={"spec": world.job(epochz=2)})
    response = case.call(app=world.app, headers=bearer(world.alice))
    assert response.status_code == 422
    case.validate_response(response, checks=[response_schema_conformance])


def test_strings_the_database_cannot_hold_are_not_a_500(store_url: str, tmp_path: Path) -> None:
    """SQLite stores any string; PostgreSQL refuses NUL bytes and names over their column's
    length, which the routes do not check first."""
    w = make_world(store_url, tmp_path)
    try:
        client = TestClient(w.app, raise_server_exceptions=False)
        sent = {
            "GET /api/jobs/a%00": client.get("/api/jobs/a%00", headers=bearer(w.admin)),
            "POST /api/jobs/a%00/cancel": client.post(
                "/api/jobs/a%00/cancel", headers=bearer(w.admin)
            ),
            "GET /api/jobs?user=a%00": client.get("/api/jobs?user=a%00", headers=bearer(w.admin)),
            "GET /api/jobs?state=a%00": client.get("/api/jobs?state=a%00", headers=bearer(w.admin)),
            "POST /api/jobs, name of 129": client.post(
                "/api/jobs", json={"spec": w.job("n" * 129)}, headers=bearer(w.alice)
            ),
        }
        failed = {what: r.status_code for what, r in sent.items() if r.status_code >= 500}
        assert not failed, failed
    finally:
        w.store.close()
