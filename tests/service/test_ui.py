"""The web UI in a real headless Chromium, against a real ``corral server`` process.

The module starts one server, makes two teams with a user each through the REST API, and
runs a small real training job for team vision; team speech's job waits in the queue for
good (its quota is cut below its demand once it is queued behind vision's running job).
Screenshots of the three main pages are saved with each test's files; to refresh the ones
the README shows, run with ``CORRAL_SCREENSHOTS=docs/screenshots`` (a test run leaves the
source tree as it found it otherwise).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import start_server

playwright = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, Page, expect  # noqa: E402

pytestmark = pytest.mark.slow
SCREENSHOTS = os.environ.get("CORRAL_SCREENSHOTS")
FINAL = ("succeeded", "failed", "cancelled")
ERRORS: list[str] = []  # the browser console's errors on user ada's pages


@dataclass
class Service:
    url: str
    admin: str
    tokens: dict[str, str]
    jobs: dict[str, str] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    def api(self, who: str) -> httpx.Client:
        token = self.admin if who == "admin" else self.tokens[who]
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    def wait_for(self, job_id: str, states: tuple[str, ...], within: float = 90) -> str:
        """Poll the API until the job is in one of `states`; its state."""
        deadline = time.monotonic() + within
        with self.api("admin") as api:
            while True:
                state = api.get(f"/api/jobs/{job_id}").json()["state"]
                if state in states:
                    return str(state)
                assert time.monotonic() < deadline, f"job {job_id} still {state}"
                time.sleep(0.1)


def _spec(folder: Path, name: str, workers: int) -> dict[str, Any]:
    return {
        "name": name,
        "entrypoint": f"{folder / 'model.py'}:make",
        "roles": {"worker": {"count": workers}},
        "strategy": {"kind": "averaging", "every": 2},
        "data": {"path": str(folder / "train.parquet"), "features": ["a", "b"], "label": "y"},
        "validation": {"path": str(folder / "train.parquet"), "label": "y"},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "epochs": 2,
        "batch_size": 16,
    }


def _write_data(folder: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    df = pd.DataFrame({"a": rng.normal(size=400) + 3 * y, "b": rng.normal(size=400), "y": y})
    df.to_parquet(folder / "train.parquet", row_group_size=64)
    (folder / "model.py").write_text(
        textwrap.dedent("""
        import torch
        def make():
            layers = [torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)]
            return torch.nn.Sequential(*layers)
        def broken():
            raise RuntimeError("this model cannot be built")
    """)
    )


def _stop(proc: subprocess.Popen[str], service: Service) -> None:
    with service.api("admin") as api:
        for job in api.get("/api/jobs").json():
            api.post(f"/api/jobs/{job['id']}/cancel")
    for job_id in service.jobs.values():
        service.wait_for(job_id, FINAL, within=30)
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("ui")
    _write_data(tmp)
    proc, url, admin = start_server(tmp, "--cpus", "2", cwd=tmp)
    assert admin is not None
    service = Service(url=url, admin=admin, tokens={}, output=proc.output)
    try:
        with service.api("admin") as api:
            for team in ("vision", "speech"):
                api.post("/api/admin/teams", json={"name": team}).raise_for_status()
            for user, team in (("ada", "vision"), ("bob", "speech")):
                made = api.post("/api/admin/users", json={"name": user, "team": team})
                service.tokens[user] = made.raise_for_status().json()["token"]
            api.put("/api/admin/quotas/vision", json={"cpus": 2}).raise_for_status()
        with service.api("ada") as ada:
            made = ada.post("/api/jobs", json={"spec": _spec(tmp, "tiny-mlp", 2)})
            service.jobs["a"] = made.raise_for_status().json()["id"]
        # vision's job holds the whole pool, so what is submitted next has to queue
        service.wait_for(service.jobs["a"], ("running", *FINAL))
        with service.api("ada") as ada:
            made = ada.post("/api/jobs", json={"spec": _spec(tmp, "second-try", 2)})
            service.jobs["a2"] = made.raise_for_status().json()["id"]
            ada.post(f"/api/jobs/{service.jobs['a2']}/cancel").raise_for_status()
        with service.api("bob") as bob:
            made = bob.post("/api/jobs", json={"spec": _spec(tmp, "speech-secret", 1)})
            service.jobs["b"] = made.raise_for_status().json()["id"]
        with service.api("admin") as api:  # now it never fits its quota: it stays queued
            api.put("/api/admin/quotas/speech", json={"cpus": 0.5}).raise_for_status()
        yield service
    finally:
        _stop(proc, service)


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    with playwright.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


def _login(browser: Browser, service: Service, who: str) -> Page:
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(service.url + "/")
    expect(page).to_have_url(re.compile(r"/login$"))
    token = service.admin if who == "admin" else service.tokens[who]
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page).to_have_url(service.url + "/")
    return page


@pytest.fixture(scope="module")
def ada(browser: Browser, service: Service) -> Iterator[Page]:
    page = _login(browser, service, "ada")
    # a script the CSP blocks, or one that throws, shows up here
    page.on("console", lambda m: m.type == "error" and ERRORS.append(m.text))
    page.on("pageerror", lambda e: ERRORS.append(str(e)))
    yield page
    page.context.close()


def _shoot(page: Page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=tmp_path / name, full_page=True)
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(SCREENSHOTS) / name)


def test_pages_need_a_login_and_a_bad_token_is_refused(browser: Browser, service: Service):
    page = browser.new_page()
    page.goto(f"{service.url}/jobs/{service.jobs['a']}")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fjobs%2F"))
    page.fill("#token", "crl_" + "x" * 43)
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("not valid")
    assert not page.context.cookies()
    page.goto(service.url + "/cluster")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fcluster$"))

    page.fill("#token", service.tokens["ada"])
    page.click("button[type=submit]")
    expect(page).to_have_url(service.url + "/cluster")  # back where it was going
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "corral_token" and cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    assert service.tokens["ada"] not in page.content() + page.url
    assert page.request.get(service.url + "/api/me").json()["name"] == "ada"  # the cookie
    page.click("text=Log out")
    expect(page).to_have_url(re.compile(r"/login$"))
    assert not page.context.cookies()
    page.context.close()


def test_cluster_page_shows_the_pool_and_the_queue(
    ada: Page, browser: Browser, service: Service, tmp_path: Path
):
    ada.goto(service.url + "/cluster")
    expect(ada.locator("#pool")).to_contain_text("of 2")
    queue = ada.locator("#queue tbody tr")
    expect(queue).to_have_count(1)
    expect(queue).to_contain_text("speech")
    expect(queue).to_contain_text("another team's job")
    assert service.jobs["b"] not in ada.content() and "speech-secret" not in ada.content()

    admin = _login(browser, service, "admin")  # the admin sees whose job and why it waits
    admin.goto(service.url + "/cluster")
    expect(admin.locator("#queue tbody tr")).to_contain_text("speech-secret")
    expect(admin.locator("#queue tbody tr")).to_contain_text("never fits")
    expect(admin.locator("#teams")).to_contain_text("vision")
    _shoot(admin, tmp_path, "cluster.png")
    admin.context.close()


def test_job_page_shows_timeline_chart_and_log(ada: Page, service: Service, tmp_path: Path):
    ada.goto(f"{service.url}/jobs/{service.jobs['a']}")
    expect(ada.locator("h1")).to_contain_text("tiny-mlp")
    expect(ada.locator("#timeline")).to_contain_text("submitted")
    expect(ada.locator("#spec")).to_contain_text("averaging")
    # the loss chart is on a log scale first; the reader switches it to linear while the
    # page refreshes itself, and waits for the end on the page itself
    toggle = ada.locator("#log-loss")
    expect(toggle).to_be_checked(timeout=90_000)
    toggle.uncheck()
    expect(ada.locator("#state")).to_have_text("succeeded", timeout=90_000)
    expect(ada.locator("#timeline")).to_contain_text("launched")
    expect(ada.locator("#attempts")).to_contain_text("finished")
    loss = ada.locator("#chart-loss")
    expect(loss.locator("svg.scale-linear")).to_be_visible()  # the choice outlived the swaps
    expect(loss.locator("svg.scale-log")).to_be_hidden()
    toggle.check()
    expect(loss.locator("svg.scale-log")).to_be_visible()
    expect(loss.locator("svg.scale-linear")).to_be_hidden()
    expect(loss.locator("svg.scale-log")).to_have_attribute(
        "aria-label", "loss over time, log scale"
    )
    for chart in ("loss", "val_accuracy", "samples_per_s"):
        assert ada.locator(f"#chart-{chart} svg path.line").first.get_attribute("d"), chart
    expect(ada.locator("#chart-val_accuracy")).to_contain_text("validation accuracy")
    # the last line is the final metrics as text, not JSON
    expect(ada.locator("#log")).to_contain_text(re.compile(r"done: loss=[0-9.]+ accuracy="))
    assert '{"' not in ada.locator("#log").inner_text()
    # the trained model is a link away (the cookie is the login)
    link = ada.locator("#model a")
    expect(link).to_have_text("checkpoint-000002.pt")
    got = ada.request.get(service.url + str(link.get_attribute("href")))
    assert got.status == 200 and "checkpoint-000002.pt" in got.headers["content-disposition"]
    saved = torch.load(io.BytesIO(got.body()), weights_only=True)
    assert saved["data_position"]["epoch"] == 2 and "0.weight" in saved["model"]
    assert not ERRORS
    _shoot(ada, tmp_path, "job.png")


def test_jobs_table_shows_only_the_team_and_filters(ada: Page, service: Service, tmp_path: Path):
    service.wait_for(service.jobs["a"], FINAL)
    ada.goto(service.url + "/")
    rows = ada.locator("#jobs tbody tr")
    expect(rows).to_have_count(2)
    expect(ada.locator("#jobs")).to_contain_text(service.jobs["a"])
    expect(ada.locator("#jobs")).to_contain_text(service.jobs["a2"])
    assert service.jobs["b"] not in ada.content() and "speech-secret" not in ada.content()
    _shoot(ada, tmp_path, "jobs.png")

    ada.select_option("#f-state", "cancelled")
    ada.click("#f-apply")
    expect(ada).to_have_url(re.compile(r"state=cancelled"))
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text(service.jobs["a2"])
    ada.select_option("#f-state", "queued")
    ada.click("#f-apply")
    expect(ada.locator("#no-jobs")).to_be_visible()
    ada.select_option("#f-state", "succeeded")
    ada.select_option("#f-user", "ada")
    ada.click("#f-apply")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text(service.jobs["a"])


def test_another_teams_job_is_the_same_404_as_none(ada: Page, service: Service):
    answer = ada.goto(f"{service.url}/jobs/{service.jobs['b']}")
    assert answer is not None and answer.status == 404
    theirs = ada.locator("main").inner_text().replace(service.jobs["b"], "ID")
    assert "speech-secret" not in ada.content()
    answer = ada.goto(f"{service.url}/jobs/000000000000")
    assert answer is not None and answer.status == 404
    assert ada.locator("main").inner_text().replace("000000000000", "ID") == theirs


def test_a_failed_job_shows_why_instead_of_no_metrics(ada: Page, service: Service):
    with service.api("ada") as api:
        spec = api.get(f"/api/jobs/{service.jobs['a']}").json()["spec"]
        spec |= {"name": "will-fail", "entrypoint": spec["entrypoint"].replace(":make", ":broken")}
        spec["roles"] = {"worker": {"count": 1}}
        made = api.post("/api/jobs", json={"spec": spec})
        service.jobs["f"] = job_id = made.raise_for_status().json()["id"]
        assert service.wait_for(job_id, FINAL) == "failed"
        reason = api.get(f"/api/jobs/{job_id}").json()["reason"]
    ada.goto(f"{service.url}/jobs/{job_id}")
    expect(ada.locator("#failure")).to_have_text(f"Failed: {reason}")
    expect(ada.locator("#no-metrics")).to_contain_text("failed before its first report")
    assert "No metrics yet" not in ada.content()
    expect(ada.locator("#log")).to_contain_text("this model cannot be built")
    expect(ada.locator("#model")).to_have_count(0)  # no checkpoint: no link
