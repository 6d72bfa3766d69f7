"""The job service's commands: ``corral login``, ``submit``, ``jobs``, ``status``, ``logs``,
``cancel``, ``quota`` and ``corral admin …``, each one call of `corral.service.client`.

Each prints a table for people, or with ``--json`` the API's own JSON for scripts. Each
failure is one red line and exit code 1, as for ``corral train``. The heavy imports (the
client, the job model) happen inside the commands, so ``corral --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from corral.console import guarded

if TYPE_CHECKING:
    from corral.service.client import Client
    from corral.service.models import Demand, JobDetail, JobOut, Me, NewUser, QuotaOut

T = TypeVar("T")

#: Seconds between two polls of ``corral logs -f``.
FOLLOW_POLL_S = 0.5

JsonOption = Annotated[bool, typer.Option("--json", help="print the API's JSON, for scripts")]
JobArgument = Annotated[str, typer.Argument(help="the job's id, as `corral jobs` lists it")]

admin_app = typer.Typer(help="Manage teams, users and quotas (admins only).", no_args_is_help=True)
users_app = typer.Typer(help="List users, or add one: corral admin users add NAME --team T.")
teams_app = typer.Typer(help="List teams, or add one: corral admin teams add NAME.")
quota_app = typer.Typer(help="Set a team's quota.", no_args_is_help=True)
admin_app.add_typer(users_app, name="users")
admin_app.add_typer(teams_app, name="teams")
admin_app.add_typer(quota_app, name="quota")


def register(app: typer.Typer) -> None:
    """Add the service's commands to the ``corral`` app."""
    for command in (login, submit, jobs, status, logs, cancel, quota):
        app.command()(command)
    app.add_typer(admin_app, name="admin")


# -- helpers --------------------------------------------------------------------------


def _run(action: Callable[[], Any]) -> None:
    """Run `action` as ``corral train`` runs its own: an error is one line and exit 1.
    Ctrl-C leaves quietly (130): a job on the server goes on whatever its client does."""

    def quiet_interrupt() -> Any:
        try:
            return action()
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    guarded(quiet_interrupt)


def _out() -> Console:
    """Standard output for tables; wide when piped, so that lines keep whole for grep."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _note(text: str) -> None:
    Console(stderr=True, highlight=False).print(text)


@contextmanager
def _client() -> Iterator[Client]:
    from corral.service.client import Client, credentials_path, load_credentials

    with Client.from_credentials(load_credentials(credentials_path())) as client:
        yield client


def _print_json(value: Any) -> None:
    from pydantic import TypeAdapter

    print(json.dumps(TypeAdapter(type(value)).dump_python(value, mode="json"), indent=2))


def _answer(as_json: bool, call: Callable[[Client], T], render: Callable[[T], None]) -> None:
    """Make one `call` as the logged-in user; print its JSON, or `render` it for people."""

    def action() -> None:
        with _client() as client:
            value = call(client)
        if as_json:
            _print_json(value)
        else:
            render(value)

    _run(action)


def _when(at: float | None) -> str:
    return "-" if at is None else datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _demand(d: Demand) -> str:
    from corral.service.resources import amount, number

    parts = [amount("cpus", d.cpus), number("memory_mib", d.memory_mib)]
    return ", ".join([*parts, amount("gpus", d.gpus)] if d.gpus else parts)


def _state(job: JobOut) -> str:
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}
    return f"[{colour[job.state]}]{job.state}[/]" if job.state in colour else job.state


# -- the user's commands ----------------------------------------------------------------


def login(
    url: Annotated[
        str | None,
        typer.Argument(help="the server, e.g. http://host:8642 (default: the last one)"),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(help="your token; '-' reads it from stdin (default: asks, unechoed)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Log in to a corral server: check the token, then save server and token (mode 0600)."""
    from corral.service.client import (
        DEFAULT_URL,
        Client,
        Credentials,
        ServiceError,
        credentials_path,
        load_credentials,
        normalize_url,
        save_credentials,
    )

    def action() -> None:
        path = credentials_path()
        server = url
        if server is None:
            try:
                server = load_credentials(path).url
            except ServiceError:
                server = DEFAULT_URL
        server = normalize_url(server)
        secret = token
        if secret == "-":
            secret = sys.stdin.readline()
        elif secret is None:
            secret = typer.prompt(f"token for {server}", hide_input=True, err=True)
        secret = secret.strip()
        with Client(server, secret) as client:
            me = client.me()
        save_credentials(Credentials(url=server, token=secret), path)
        if as_json:
            _print_json(me)
            return
        role = ", admin" if me.admin else ""
        _out().print(f"logged in to {server} as {me.name} (team {me.team}{role})")
        if server.startswith("http://") and not _loopback(server):
            _note(f"[yellow]warning:[/] {server} is plain http: the token travels unencrypted")

    _run(action)


def _loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def submit(
    job: Annotated[Path, typer.Argument(help="YAML job spec, as for corral train")],
    priority: Annotated[int, typer.Option(help="higher runs first within your team")] = 0,
    preemptible: Annotated[
        bool, typer.Option(help="may be stopped and requeued for a higher-priority job")
    ] = False,
    expected_runtime: Annotated[
        float | None, typer.Option(help="seconds it should run: lets it backfill holes")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a YAML job to the server; paths in it are relative to the file's folder."""

    def call(client: Client) -> JobOut:
        from corral.service.client import portable_spec
        from corral.spec import load_spec

        spec = load_spec(job)
        return client.submit(
            portable_spec(spec, job.resolve().parent),
            priority=priority,
            preemptible=preemptible,
            expected_runtime_s=expected_runtime,
        )

    def render(made: JobOut) -> None:
        _out().print(f"submitted {made.name} as job {made.id}: {made.url}", markup=False)

    _answer(as_json, call, render)


def jobs(
    all_states: Annotated[
        bool, typer.Option("--all-states", help="include ended jobs, not only active ones")
    ] = False,
    state: Annotated[
        list[str] | None, typer.Option(help="only jobs in this state (repeatable)")
    ] = None,
    user: Annotated[str | None, typer.Option(help="only this user's jobs")] = None,
    as_json: JsonOption = False,
) -> None:
    """List your team's jobs, newest first: active ones unless asked otherwise."""

    def call(client: Client) -> list[JobOut]:
        from corral.service.client import ServiceError
        from corral.service.store import STATES

        for s in state or []:
            if s not in STATES:
                raise ServiceError(f"--state: no state '{s}'; one of: {', '.join(STATES)}")
        return client.jobs(states=state, user=user, all_states=all_states)

    def render(found: list[JobOut]) -> None:
        if not found:
            _note("no jobs" if all_states or state else "no active jobs (--all-states: all)")
            return
        table = Table(box=None, header_style="bold")
        for column in ("ID", "NAME", "USER", "TEAM", "STATE", "PRIO", "DEMAND", "SUBMITTED"):
            table.add_column(column, no_wrap=True)
        table.add_column("REASON")
        for j in found:
            table.add_row(
                j.id,
                j.name,
                j.user,
                j.team,
                _state(j),
                str(j.priority),
                _demand(j.demand),
                _when(j.submitted),
                escape(j.reason),
            )
        _out().print(table)

    _answer(as_json, call, render)


def status(job: JobArgument, as_json: JsonOption = False) -> None:
    """A job's state and why, its attempts and demand, and the timeline of its events."""

    def render(found: JobDetail) -> None:
        out = _out()
        out.print(f"[bold]job {found.id}[/] {found.name}  {found.url}")
        took = ""
        if found.started is not None and found.ended is not None:
            took = f" (ran {found.ended - found.started:.1f} s)"
        facts = Table.grid(padding=(0, 2))
        for key, value in (
            ("state", f"{_state(found)}: {escape(found.reason)}"),
            ("owner", f"{found.user} (team {found.team})"),
            ("priority", str(found.priority)),
            ("demand", _demand(found.demand)),
            ("attempts", f"{found.attempts} (restarts allowed: {found.max_restarts})"),
            ("submitted", _when(found.submitted)),
            ("started", _when(found.started)),
            ("ended", _when(found.ended) + took),
        ):
            facts.add_row(key, value)
        out.print(facts)
        epochs = [m for m in found.metrics if m.get("kind") == "epoch"]
        if epochs:
            last = {k: v for k, v in epochs[-1].items() if k not in ("kind", "time")}
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()
            )
            out.print(f"last epoch: {shown}", markup=False)
        timeline = Table(title="timeline", title_justify="left", box=None, header_style="bold")
        for column in ("TIME", "STATE", "REASON"):
            timeline.add_column(column)
        for e in found.events:
            timeline.add_row(_when(e.at), e.state, escape(e.reason))
        out.print(timeline)

    _answer(as_json, lambda client: client.job(job), render)


def logs(
    job: JobArgument,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new lines until the job ends")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Print a job's output; with -f, follow it to its end. (--json: a page per line.)"""

    def action() -> None:
        after = 0
        with _client() as client:
            while True:
                page = client.logs(job, after)
                after = page.next
                if as_json:
                    if page.lines or not (follow and not page.final):
                        print(page.model_dump_json(), flush=True)
                else:
                    for line in page.lines:
                        print(line, flush=True)
                if page.lines:
                    continue  # a page holds at most 1000 lines: more may wait
                if not follow or page.final:
                    return
                time.sleep(FOLLOW_POLL_S)

    _run(action)


def cancel(job: JobArgument, as_json: JsonOption = False) -> None:
    """Cancel a job: a queued one at once, a running one within seconds; an ended one stays."""

    def render(found: JobOut) -> None:
        if found.state == "cancelled":
            said = f"job {found.id} cancelled"
        elif found.state in ("succeeded", "failed"):
            said = f"job {found.id} had already ended ({found.state}): nothing to cancel"
        else:
            said = f"job {found.id} is stopping (it was {found.state})"
        _out().print(said)

    _answer(as_json, lambda client: client.cancel(job), render)


def quota(as_json: JsonOption = False) -> None:
    """Your team's quota, and what its running jobs use of it."""

    def render(q: QuotaOut) -> None:
        from corral.service.resources import DIMS, label, number

        table = Table(title=f"team {q.team}", title_justify="left", box=None, header_style="bold")
        for column in ("RESOURCE", "USED", "QUOTA"):
            table.add_column(column)
        for dim in DIMS:
            cap = getattr(q.quota, dim)
            used = number(dim, getattr(q.used, dim))
            table.add_row(label(dim), used, "no cap" if cap is None else number(dim, cap))
        _out().print(table)

    _answer(as_json, lambda client: client.quota(), render)


# -- corral admin ---------------------------------------------------------------------


@users_app.callback(invoke_without_command=True)
def users(ctx: typer.Context, as_json: JsonOption = False) -> None:
    if ctx.invoked_subcommand is None:
        list_users(as_json)


@users_app.command("list")
def list_users(as_json: JsonOption = False) -> None:
    """Every user: name, team, whether an admin."""

    def render(found: list[Me]) -> None:
        table = Table(box=None, header_style="bold")
        for column in ("NAME", "TEAM", "ADMIN"):
            table.add_column(column)
        for u in found:
            table.add_row(u.name, u.team, "yes" if u.admin else "")
        _out().print(table)

    _answer(as_json, lambda client: client.users(), render)


@users_app.command("add")
def add_user(
    name: Annotated[str, typer.Argument(help="the user's name")],
    team: Annotated[str, typer.Option(help="the team the user belongs to")],
    admin: Annotated[bool, typer.Option("--admin", help="may manage teams, users, quotas")] = False,
    as_json: JsonOption = False,
) -> None:
    """Add a user, and show their token: once, since the server keeps only its hash."""
    server = ""

    def call(client: Client) -> NewUser:
        nonlocal server
        server = client.url
        return client.add_user(name, team, admin=admin)

    def render(made: NewUser) -> None:
        _out().print(
            f"created user '{made.name}' (team '{made.team}'). Its token, shown only this "
            f"once:\n  {made.token}\nlog in with: corral login {server}",
            markup=False,
        )

    _answer(as_json, call, render)


@teams_app.callback(invoke_without_command=True)
def teams(ctx: typer.Context, as_json: JsonOption = False) -> None:
    if ctx.invoked_subcommand is None:
        list_teams(as_json)


@teams_app.command("list")
def list_teams(as_json: JsonOption = False) -> None:
    """Every team's name."""
    _answer(as_json, lambda client: client.teams(), lambda found: print("\n".join(found)))


@teams_app.command("add")
def add_team(
    name: Annotated[str, typer.Argument(help="the team's name")], as_json: JsonOption = False
) -> None:
    """Add a team."""

    def render(_: list[str]) -> None:
        _out().print(f"created team '{name}'", markup=False)

    _answer(as_json, lambda client: client.add_team(name), render)


@quota_app.command("set")
def set_quota(
    team: Annotated[str, typer.Argument(help="the team")],
    cpus: Annotated[float | None, typer.Option(help="CPUs its running jobs may use")] = None,
    memory: Annotated[str | None, typer.Option(help="memory, e.g. 16g or 512m")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs its running jobs may use")] = None,
    as_json: JsonOption = False,
) -> None:
    """Set a team's caps. A cap not given is removed: that resource is then uncapped."""

    def call(client: Client) -> QuotaOut:
        from corral.spec import RoleSpec, parse

        mib = parse(RoleSpec, {"memory": memory}, source="--memory").memory if memory else None
        return client.set_quota(team, cpus=cpus, memory_mib=mib, gpus=gpus)

    def render(q: QuotaOut) -> None:
        from corral.service.resources import DIMS, amount, label

        caps = [
            f"no cap on {label(dim)}" if cap is None else amount(dim, cap)
            for dim, cap in ((dim, getattr(q.quota, dim)) for dim in DIMS)
        ]
        _out().print(f"quota of team {q.team}: {', '.join(caps)}", markup=False)

    _answer(as_json, call, render)
