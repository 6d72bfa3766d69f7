"""The search pages in a real headless Chromium, against the service's app served here.

No trial trains: each search is made with `SearchStore.create`, and its trials are told
to its Optuna study as the driver tells them (the values, a report per epoch, the id of
a job added to the store), so the pages show complete, pruned and failed trials within
a second. The app (`create_app`, the API and the UI as ``corral server`` serves them) runs
under uvicorn in a thread, on a socket bound and listening before the browser starts: the
first request waits in its backlog, so nothing races the server's start.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import uvicorn
import yaml
from conftest import job_spec
from optuna.trial import TrialState

from corral.runtime.resources import Resources
from corral.search.driver import JOB_ATTR, REASON_ATTR, SearchRequest
from corral.service.api import create_app
from corral.service.searches import Search, SearchStore
from corral.service.store import Store, User
from corral.service.tuning import search_request
from corral.spec import JobSpec, parse

playwright = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, Page, expect  # noqa: E402

pytestmark = pytest.mark.slow

POOL = Resources(cpus=4, memory_mib=8192)
SPACE = {
    "optimizer.lr": {"low": 0.001, "high": 0.3, "log": True},
    "batch_size": {"choices": [16, 32, 64]},
    "optimizer.name": {"choices": ["sgd", "adam"]},
}


@dataclass(frozen=True)
class Told:
    """A trial as the test tells it: its values, its reports, how it ended."""

    params: dict[str, Any]
    history: Sequence[float]
    state: TrialState
    reason: str = ""


#: Search "lr-bs" of ada's: three completed trials (the best is 1), a pruned one and a
#: failed one.
TRIALS = (
    Told({"optimizer.lr": 0.01, "batch_size": 32, "optimizer.name": "sgd"}, [0.6, 0.75, 0.8],
         TrialState.COMPLETE),
    Told({"optimizer.lr": 0.1, "batch_size": 64, "optimizer.name": "adam"}, [0.7, 0.85, 0.9],
         TrialState.COMPLETE),
    Told({"optimizer.lr": 0.001, "batch_size": 16, "optimizer.name": "sgd"}, [0.3],
         TrialState.PRUNED, "pruned at epoch 1 (accuracy 0.3)"),
    Told({"optimizer.lr": 0.2, "batch_size": 16, "optimizer.name": "adam"}, [0.5, 0.6, 0.65],
         TrialState.COMPLETE),
    Told({"optimizer.lr": 0.3, "batch_size": 64, "optimizer.name": "sgd"}, [0.55],
         TrialState.FAIL, "the job failed: CUDA out of memory"),
)  # fmt: skip


@dataclass
class Service:
    url: str
    store: Store
    folder: Path
    users: dict[str, User] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    searches: dict[str, Search] = field(default_factory=dict)

    def search(self, who: str, name: str, trials: int = 6) -> Search:
        settings = {
            "name": name,
            "metric": "accuracy",
            "mode": "max",
            "trials": trials,
            "sampler": "random",
            "pruner": "median",
        }
        body = search_request(job_spec(self.folder), SPACE, settings)
        made, _ = SearchStore(self.store).create(self.users[who], SearchRequest(**body))
        return made

    def tell(self, search: Search, trials: Sequence[Told]) -> None:
        """Tell `trials` to the search's study as its driver would, each with a job."""
        study: optuna.Study = SearchStore(self.store).study(search)
        for told in trials:
            study.enqueue_trial(told.params)
            trial = study.ask()
            search.request.space.suggest(trial)
            spec = {**search.request.spec, "name": f"{search.name}-t{trial.number}"}
            job, _ = self.store.add_job(
                user=self.users[search.user], name=spec["name"], spec=spec, demand=POOL
            )
            study._storage.set_trial_system_attr(trial._trial_id, JOB_ATTR, job.id)
            for epoch, value in enumerate(told.history, start=1):
                trial.report(value, epoch)
            if told.state == TrialState.COMPLETE:
                study.tell(trial, told.history[-1])
            else:
                study._storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, told.reason)
                study.tell(trial, state=told.state)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Teams vision (ada) and speech (bob), an admin; ada's searches "lr-bs" (ended, with
    `TRIALS`) and "warmup" (running, one trial), bob's "speech-secret"; the app served."""
    folder = tmp_path_factory.mktemp("ui-search")
    store = Store(f"sqlite:///{folder / 'corral.db'}")
    listener = socket.create_server(("127.0.0.1", 0))
    service = Service(f"http://127.0.0.1:{listener.getsockname()[1]}", store, folder)
    for team, name in (("vision", "ada"), ("speech", "bob"), ("ops", "root")):
        store.create_team(team)
        service.users[name], service.tokens[name] = store.create_user(
            name, team, admin=name == "root"
        )
    service.searches["lr"] = service.search("ada", "lr-bs")
    service.tell(service.searches["lr"], TRIALS)
    SearchStore(store).end(service.searches["lr"].id, "succeeded", "the best is trial 1")
    service.searches["warmup"] = service.search("ada", "warmup", trials=4)
    service.tell(service.searches["warmup"], TRIALS[:1])
    service.searches["secret"] = service.search("bob", "speech-secret")
    service.tell(service.searches["secret"], TRIALS[:2])

    config = uvicorn.Config(create_app(store, pool=POOL), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
        store.close()


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    with playwright.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


def _login(browser: Browser, service: Service, who: str, errors: list[str]) -> Page:
    """A page logged in as `who` through the login form; the console's errors and the
    page's uncaught ones (a script the CSP blocks, one that throws) go to `errors`."""
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.goto(service.url + "/searches")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fsearches$"))
    page.fill("#token", service.tokens[who])
    page.click("button[type=submit]")
    expect(page).to_have_url(service.url + "/searches")
    # from here (the browser's own favicon.ico request, a 404, is before)
    page.on("console", lambda m: m.type == "error" and errors.append(f"{m.text} {m.location}"))
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page


@pytest.fixture
def errors() -> list[str]:
    return []


@pytest.fixture
def ada(browser: Browser, service: Service, errors: list[str]) -> Iterator[Page]:
    page = _login(browser, service, "ada", errors)
    yield page
    page.context.close()


@pytest.fixture
def bob(browser: Browser, service: Service, errors: list[str]) -> Iterator[Page]:
    page = _login(browser, service, "bob", errors)
    yield page
    page.context.close()


def test_the_list_shows_the_teams_searches_newest_first(
    ada: Page, browser: Browser, service: Service, errors: list[str], tmp_path: Path
):
    expect(ada.locator("nav a.here")).to_have_text("Searches")
    rows = ada.locator("#searches tbody tr")
    vision = [s.id for s in SearchStore(service.store).list(team="vision")]
    assert service.searches["lr"].id in vision and service.searches["warmup"].id in vision
    expect(rows).to_have_count(len(vision))
    assert [rows.nth(i).get_attribute("data-search") for i in range(len(vision))] == vision
    lr = ada.locator(f"#searches tr[data-search='{service.searches['lr'].id}']")
    for text in ("lr-bs", "ada", "vision", "succeeded", "5 of 6", "accuracy 0.9"):
        expect(lr).to_contain_text(text)
    expect(ada.locator(f"tr[data-search='{service.searches['warmup'].id}']")).to_contain_text(
        "1 of 4"
    )
    assert service.searches["secret"].id not in ada.content()
    assert "speech-secret" not in ada.content()
    ada.screenshot(path=tmp_path / "searches.png", full_page=True)

    admin = _login(browser, service, "root", errors)  # the admin sees every team's
    expect(admin.locator(f"tr[data-search='{service.searches['secret'].id}']")).to_contain_text(
        "speech-secret"
    )
    admin.context.close()
    assert not errors


def test_the_search_page_shows_trials_and_pictures(
    ada: Page, service: Service, errors: list[str], tmp_path: Path
):
    search = service.searches["lr"]
    ada.click(f"#searches a:text-is('{search.name}')")
    expect(ada).to_have_url(f"{service.url}/searches/{search.id}")
    expect(ada.locator("h1")).to_contain_text("lr-bs")
    summary = ada.locator("#summary")
    for text in ("succeeded", "accuracy", "higher is better", "random", "median", "5 of 6"):
        expect(summary).to_contain_text(text)
    expect(ada.locator("#reason")).to_have_text("the best is trial 1")
    expect(ada.locator(".live-note")).to_have_count(0)  # an ended search is not live

    rows = ada.locator("#trials tbody tr")
    expect(rows).to_have_count(len(TRIALS))
    expect(ada.locator("#trials tr.best")).to_have_count(1)
    best = ada.locator("#trials tr.best")
    expect(best).to_have_attribute("data-trial", "1")
    expect(best).to_contain_text("best")
    expect(best).to_contain_text("adam")
    expect(ada.locator("#trials thead")).to_contain_text("lr")
    pruned, failed = rows.nth(2), rows.nth(4)
    expect(pruned).to_contain_text("pruned at epoch 1")
    expect(failed).to_contain_text("fail")
    expect(failed).to_contain_text("CUDA out of memory")
    job = failed.locator("a")
    expect(job).to_have_attribute("href", re.compile(r"^/jobs/[0-9a-f]+$"))
    job_id = str(job.get_attribute("href")).rsplit("/", 1)[1]
    assert service.store.job(job_id).name == "lr-bs-t4"  # the trial's own job

    # (1) the metric per epoch: a line per trial, the pruned one stopping after epoch 1
    lines = ada.locator("#epochs svg path.trial")
    expect(lines).to_have_count(len(TRIALS))
    expect(ada.locator("#epochs svg path.trial.best")).to_have_attribute("data-trial", "1")
    stopped = ada.locator("#epochs svg path.trial[data-trial='2']")
    assert str(stopped.get_attribute("d")).count("L") == 0  # one point: no segment
    assert str(lines.and_(ada.locator("[data-trial='0']")).get_attribute("d")).count("L") == 2
    expect(stopped.locator("title")).to_contain_text("trial 2 · pruned")
    expect(ada.locator("#epochs svg path.stop")).to_have_count(1)
    # (2) importance: one bar per parameter, the most important first
    bars = ada.locator("#importance svg g.importance")
    expect(bars).to_have_count(len(SPACE))
    expect(ada.locator("#no-importance")).to_have_count(0)
    # (3) parallel coordinates: an axis per parameter and the metric, a line per trial
    # that completed or was pruned
    axes = ada.locator("#parallel svg g.pc-axis")
    expect(axes).to_have_count(len(SPACE) + 1)
    expect(axes.nth(0)).to_contain_text("log scale")
    expect(axes.nth(1)).to_contain_text("by choice")
    polylines = ada.locator("#parallel svg polyline.pc")
    expect(polylines).to_have_count(4)
    assert sorted(polylines.nth(i).get_attribute("data-trial") or "" for i in range(4)) == [
        "0",
        "1",
        "2",
        "3",
    ]
    best_line = ada.locator("#parallel svg polyline.pc.best")
    expect(best_line).to_have_attribute("data-trial", "1")
    expect(best_line.locator("title")).to_contain_text("optimizer.lr=0.1")
    assert len(str(best_line.get_attribute("points")).split()) == len(SPACE) + 1
    for picture in ("#epochs", "#importance", "#parallel"):
        expect(ada.locator(f"{picture} svg")).to_be_visible()
        expect(ada.locator(f"{picture} svg")).to_have_attribute("role", "img")
    expect(ada.locator("#best-spec")).to_contain_text("name: lr-bs-best")
    ada.screenshot(path=tmp_path / "search.png", full_page=True)
    assert not errors


def test_the_best_trials_job_downloads_as_a_valid_spec(ada: Page, service: Service):
    search = service.searches["lr"]
    ada.goto(f"{service.url}/searches/{search.id}")
    with ada.expect_download() as download:
        ada.click("#best-download")
    assert download.value.suggested_filename == "lr-bs-best.yaml"
    text = Path(download.value.path()).read_text()
    spec = parse(JobSpec, yaml.safe_load(text), source="best.yaml")
    assert (spec.name, spec.optimizer.lr, spec.optimizer.name, spec.batch_size) == (
        "lr-bs-best",
        0.1,
        "adam",
        64,
    )
    got = ada.request.get(f"{service.url}/searches/{search.id}/best.yaml")
    assert got.status == 200 and got.headers["content-type"].startswith("text/yaml")
    assert got.text() == text
    # a running search's best so far is there too; a search with no completed trial has none
    warmup = ada.request.get(f"{service.url}/searches/{service.searches['warmup'].id}/best.yaml")
    assert warmup.status == 200 and "warmup-best" in warmup.text()
    empty = service.search("ada", "nothing-yet")
    service.tell(empty, TRIALS[2:3])  # pruned only
    got = ada.request.get(f"{service.url}/searches/{empty.id}/best.yaml")
    assert got.status == 404 and "no trial of this search has completed" in got.text()
    ada.goto(f"{service.url}/searches/{empty.id}")
    expect(ada.locator("#no-best")).to_be_visible()
    expect(ada.locator("#best-download")).to_have_count(0)


def test_another_teams_search_is_the_same_404_as_none(bob: Page, service: Service):
    theirs = service.searches["lr"].id
    answer = bob.goto(f"{service.url}/searches/{theirs}")
    assert answer is not None and answer.status == 404
    text = bob.locator("main").inner_text().replace(theirs, "ID")
    assert "lr-bs" not in bob.content()
    answer = bob.goto(f"{service.url}/searches/000000000000")
    assert answer is not None and answer.status == 404
    assert bob.locator("main").inner_text().replace("000000000000", "ID") == text
    for path in (f"/searches/{theirs}/best.yaml", f"/searches/{theirs}/live"):
        got = bob.request.get(service.url + path)
        assert got.status == 404 and "lr-bs" not in got.text(), path
    bob.goto(f"{service.url}/searches")
    assert theirs not in bob.content()
    expect(bob.locator("#searches tbody tr")).to_have_count(1)  # bob's own


def test_a_running_search_page_follows_its_trials(ada: Page, service: Service, errors: list[str]):
    """The page of a running search swaps in new trials on its own, and stops once the
    search has ended."""
    search = service.search("ada", "follow-me", trials=3)
    service.tell(search, TRIALS[:1])
    ada.goto(f"{service.url}/searches/{search.id}")
    expect(ada.locator("#state")).to_have_text("running")
    expect(ada.locator(".live-note")).to_be_visible()
    expect(ada.locator("#trials tbody tr")).to_have_count(1)
    expect(ada.locator("#no-importance")).to_be_visible()  # one completed trial only
    expect(ada.locator("#epochs svg path.trial")).to_have_count(1)

    service.tell(search, TRIALS[1:3])
    expect(ada.locator("#trials tbody tr")).to_have_count(3, timeout=15_000)
    expect(ada.locator("#epochs svg path.trial")).to_have_count(3)
    expect(ada.locator("#parallel svg polyline.pc")).to_have_count(3)
    expect(ada.locator("#trials tr.best")).to_have_attribute("data-trial", "1")

    SearchStore(service.store).end(search.id, "succeeded", "the best is trial 1")
    expect(ada.locator("#state")).to_have_text("succeeded", timeout=15_000)
    expect(ada.locator("#live")).to_have_attribute("data-active", "no")
    expect(ada.locator(".live-note")).to_have_count(0)
    assert not errors
