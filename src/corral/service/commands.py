"""The job service's commands: ``corral login``, ``profiles``, ``submit``, ``jobs``,
``status``, ``logs``, ``model``, ``cancel``, ``quota``, ``mlflow-login`` and ``corral
admin …``, each one call of `corral.service.client`.

Each prints a table for people, or with ``--json`` the API's own JSON for scripts. Each
failure is one red line and exit code 1, as for ``corral train``. Every command runs as
the default login (the last ``corral login``), or as the one ``corral --profile NAME``
(or ``$CORRAL_PROFILE``) names. The heavy imports (the client, the job model, torch)
happen inside the commands, so ``corral --help`` stays fast.
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
    from corral.service.mlflow_auth import MlflowLogin
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


#: The environment variable that picks a saved login, as ``corral --profile NAME`` does.
PROFILE_ENV = "CORRAL_PROFILE"
#: Where the chosen profile travels from ``corral --profile`` to the command (click's
#: ``Context.meta``, which every nested context shares).
_PROFILE = "corral.profile"
ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile",
        envvar=PROFILE_ENV,
        help="run the service commands as this saved login (default: the last one logged in)",
    ),
]


def register(app: typer.Typer) -> None:
    """Add the service's commands, and the ``--profile`` they share, to the ``corral`` app."""
    app.callback()(choose_profile)
    for command in (login, profiles, submit, jobs, status, logs, model, cancel, quota):
        app.command()(command)
    app.command("mlflow-login")(mlflow_login)
    app.add_typer(admin_app, name="admin")


def choose_profile(ctx: typer.Context, profile: ProfileOption = None) -> None:
    ctx.meta[_PROFILE] = profile


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


def _note(text: str, *, markup: bool = True) -> None:
    """A line for people on stderr, unwrapped (the terminal wraps it), so grep finds it."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(text, markup=markup)


def _profile(ctx: typer.Context) -> str | None:
    """The profile ``corral --profile`` (or ``$CORRAL_PROFILE``) chose; None: the default."""
    from corral.service.client import check_profile_name

    chosen = ctx.meta.get(_PROFILE)
    return None if chosen is None else check_profile_name(chosen)


@contextmanager
def _client(ctx: typer.Context) -> Iterator[Client]:
    """A client logged in as the chosen profile."""
    from corral.service.client import Client, credentials_path, load_credentials

    with Client.from_credentials(load_credentials(credentials_path(), _profile(ctx))) as client:
        yield client


def _print_json(value: Any) -> None:
    from pydantic import TypeAdapter

    print(json.dumps(TypeAdapter(type(value)).dump_python(value, mode="json"), indent=2))


def _answer(
    ctx: typer.Context, as_json: bool, call: Callable[[Client], T], render: Callable[[T], None]
) -> None:
    """Make one `call` as the chosen login; print its JSON, or `render` it for people."""

    def action() -> None:
        with _client(ctx) as client:
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
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Argument(help="the server, e.g. http://host:8642 (default: the profile's)"),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(help="your token; '-' reads it from stdin (default: asks, unechoed)"),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(help="save the login under this name (default: your user name)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Log in to a corral server, beside your other logins; this one becomes the default.

    The token is checked, then saved (mode 0600) as a profile named after you (or
    --profile): corral --profile NAME picks another saved login.
    """
    from corral.service.client import (
        DEFAULT_URL,
        Client,
        Credentials,
        ServiceError,
        credentials_path,
        load_credentials,
        load_logins,
        normalize_url,
        save_credentials,
    )

    def action() -> None:
        path = credentials_path()
        chosen = profile or _profile(ctx)
        server = url
        if server is None:
            try:
                server = load_credentials(path, chosen).url
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
        name = chosen or me.name
        save_credentials(
            Credentials(url=server, token=secret, user=me.name, team=me.team), path, name
        )
        if as_json:
            _print_json(me)
            return
        role = ", admin" if me.admin else ""
        _out().print(f"logged in to {server} as {me.name} (team {me.team}{role})")
        others = sorted(set(load_logins(path).profiles) - {name})
        kept = f" (also saved: {', '.join(others)})" if others else ""
        _note(f"saved as profile '{name}', now the default{kept}", markup=False)
        _note(f"in {path}; corral --profile NAME … runs as another", markup=False)
        if server.startswith("http://") and not _loopback(server):
            _note(f"[yellow]warning:[/] {server} is plain http: the token travels unencrypted")

    _run(action)


def profiles(as_json: JsonOption = False) -> None:
    """The saved logins: each profile's user, team and server; * marks the default."""
    from corral.service.client import credentials_path, load_logins

    def action() -> None:
        logins = load_logins(credentials_path())
        if as_json:
            listed = {
                name: {"url": c.url, "user": c.user, "team": c.team}
                for name, c in sorted(logins.profiles.items())
            }
            print(json.dumps({"default": logins.default, "profiles": listed}, indent=2))
            return
        if not logins.profiles:
            _note("no saved logins: corral login URL")
            return
        table = Table(box=None, header_style="bold")
        for column in ("", "PROFILE", "USER", "TEAM", "SERVER"):
            table.add_column(column, no_wrap=True)
        for name, c in sorted(logins.profiles.items()):
            mark = "*" if name == logins.default else ""
            table.add_row(mark, name, c.user or "?", c.team or "?", c.url)
        _out().print(table, markup=False)

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
    ctx: typer.Context,
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

    _answer(ctx, as_json, call, render)


def jobs(
    ctx: typer.Context,
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

    _answer(ctx, as_json, call, render)


def status(ctx: typer.Context, job: JobArgument, as_json: JsonOption = False) -> None:
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

    _answer(ctx, as_json, lambda client: client.job(job), render)


def logs(
    ctx: typer.Context,
    job: JobArgument,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new lines until the job ends")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Print a job's output; with -f, follow it to its end. (--json: a page per line.)"""

    def action() -> None:
        after = 0
        with _client(ctx) as client:
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


def model(
    ctx: typer.Context,
    job: JobArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="the file to write")] = Path(
        "model.pt"
    ),
    checkpoint: Annotated[
        bool,
        typer.Option(
            "--checkpoint",
            help="write the whole checkpoint (model, optimizer, data position, history), "
            "which resume_from accepts, not only the model's state_dict",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Download a job's trained model, for model.load_state_dict(torch.load(PATH)).

    It is the state_dict of the job's final checkpoint (its newest, while it runs).
    """

    def action() -> None:
        from corral.runtime import checkpoint as ckpt
        from corral.service.client import ServiceError

        whole = output if checkpoint else output.with_name(f".{output.name}.checkpoint")
        with _client(ctx) as client:
            state = client.job(job).state
            try:
                name = client.save_checkpoint(job, whole)
                saved = ckpt.load(whole)  # a corral checkpoint, or a one-line error
                if not checkpoint:
                    if "model" not in saved:
                        raise ServiceError(f"job {job}'s {name} holds no model state_dict")
                    _save(saved["model"], output)
            finally:
                if not checkpoint:
                    whole.unlink(missing_ok=True)
        epoch = saved.get("data_position", {}).get("epoch")
        if as_json:
            got = {"job": job, "state": state, "checkpoint": name, "epoch": epoch}
            print(json.dumps({**got, "path": str(output), "whole": checkpoint}, indent=2))
            return
        what = "checkpoint" if checkpoint else "model"
        _out().print(
            f"saved the {what} of job {job} (epoch {epoch}, {name}) to {output}", markup=False
        )
        if state != "succeeded":
            _note(f"job {job} is {state}: this is its newest checkpoint, not a final one")

    _run(action)


def _save(state_dict: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, then renamed: `path` is whole or untouched."""
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state_dict, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def cancel(ctx: typer.Context, job: JobArgument, as_json: JsonOption = False) -> None:
    """Cancel a job: a queued one at once, a running one within seconds; an ended one stays."""

    def render(found: JobOut) -> None:
        if found.state == "cancelled":
            said = f"job {found.id} cancelled"
        elif found.state in ("succeeded", "failed"):
            said = f"job {found.id} had already ended ({found.state}): nothing to cancel"
        else:
            said = f"job {found.id} is stopping (it was {found.state})"
        _out().print(said)

    _answer(ctx, as_json, lambda client: client.cancel(job), render)


def quota(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Your team's quota, and what its running jobs use of it."""

    def render(q: QuotaOut) -> None:
        from corral.runtime.resources import DIMS
        from corral.service.resources import label, number

        table = Table(title=f"team {q.team}", title_justify="left", box=None, header_style="bold")
        for column in ("RESOURCE", "USED", "QUOTA"):
            table.add_column(column)
        for dim in DIMS:
            cap = getattr(q.quota, dim)
            used = number(dim, getattr(q.used, dim))
            table.add_row(label(dim), used, "no cap" if cap is None else number(dim, cap))
        _out().print(table)

    _answer(ctx, as_json, lambda client: client.quota(), render)


def mlflow_login(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Print the shell lines that log MLflow in to your team's runs, as you, read-only:
    eval "$(corral mlflow-login)". Each call makes a new password; the last one stops
    working."""

    def render(login: MlflowLogin) -> None:
        import shlex

        variables = {"MLFLOW_TRACKING_URI": login.uri}
        if login.username is not None and login.password is not None:
            variables["MLFLOW_TRACKING_USERNAME"] = login.username
            variables["MLFLOW_TRACKING_PASSWORD"] = login.password
        for name, value in variables.items():
            print(f"export {name}={shlex.quote(value)}")
        if login.username is None:
            _note(f"# experiment '{login.experiment}': this MLflow has no users, anyone reads it")
        else:
            _note(
                f"# {login.username} reads experiment '{login.experiment}', your team's runs; "
                "the next mlflow-login replaces this password"
            )

    _answer(ctx, as_json, lambda client: client.mlflow_login(), render)


# -- corral admin ---------------------------------------------------------------------


@users_app.callback(invoke_without_command=True)
def users(ctx: typer.Context, as_json: JsonOption = False) -> None:
    if ctx.invoked_subcommand is None:
        list_users(ctx, as_json)


@users_app.command("list")
def list_users(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every user: name, team, whether an admin."""

    def render(found: list[Me]) -> None:
        table = Table(box=None, header_style="bold")
        for column in ("NAME", "TEAM", "ADMIN"):
            table.add_column(column)
        for u in found:
            table.add_row(u.name, u.team, "yes" if u.admin else "")
        _out().print(table)

    _answer(ctx, as_json, lambda client: client.users(), render)


@users_app.command("add")
def add_user(
    ctx: typer.Context,
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

    _answer(ctx, as_json, call, render)


@teams_app.callback(invoke_without_command=True)
def teams(ctx: typer.Context, as_json: JsonOption = False) -> None:
    if ctx.invoked_subcommand is None:
        list_teams(ctx, as_json)


@teams_app.command("list")
def list_teams(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every team's name."""
    _answer(ctx, as_json, lambda client: client.teams(), lambda found: print("\n".join(found)))


@teams_app.command("add")
def add_team(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the team's name")],
    as_json: JsonOption = False,
) -> None:
    """Add a team."""

    def render(_: list[str]) -> None:
        _out().print(f"created team '{name}'", markup=False)

    _answer(ctx, as_json, lambda client: client.add_team(name), render)


@quota_app.command("set")
def set_quota(
    ctx: typer.Context,
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
        from corral.runtime.resources import DIMS
        from corral.service.resources import amount, label

        caps = [
            f"no cap on {label(dim)}" if cap is None else amount(dim, cap)
            for dim, cap in ((dim, getattr(q.quota, dim)) for dim in DIMS)
        ]
        _out().print(f"quota of team {q.team}: {', '.join(caps)}", markup=False)

    _answer(ctx, as_json, call, render)
