"""The job service's client: a small typed HTTP client for ``/api``, and the saved logins.

Every failure a user can cause or meet (not logged in, a refused token, another team's job,
a spec the server refuses, a server that is not running) becomes one `ServiceError` whose
message says what to do, so the CLI prints it as one line. The token travels only in the
``Authorization`` header and the credentials file (mode 0600); no message, repr or log
line holds it.

The credentials file keeps several logins, each under a profile name (the user's name
unless given), and which one is the default (the last login). So an admin and a user, or
one user on two servers, stay logged in side by side.

Example:
    >>> client = Client.from_credentials(load_credentials(credentials_path(), "ada"))
    >>> job = client.submit(spec, priority=5)
    >>> client.job(job.id).state
    'queued'
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter, ValidationError

from corral.errors import CorralError
from corral.service.mlflow_auth import MlflowLogin
from corral.service.models import (
    JobDetail,
    JobOut,
    LogPage,
    Me,
    NewUser,
    QuotaOut,
    SearchDetail,
    SearchOut,
)

if TYPE_CHECKING:
    from corral.spec import AnyJobSpec

#: The environment variable that moves the credentials file (tests, several machines).
CONFIG_ENV = "CORRAL_CONFIG"
#: Where `corral login` points when given no URL and none was saved: the server's default.
DEFAULT_URL = "http://127.0.0.1:8642"
#: Seconds before a retried submission, after a connection error.
RETRY_PAUSE_S = 0.5
#: What a profile may be called: a user's name is one.
PROFILE_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class ServiceError(CorralError):
    """The service refused a request, or could not be reached; the message says why."""


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """Which server to talk to, and as whom (`user` and `team`, for listing logins)."""

    url: str
    token: str = field(repr=False)
    user: str = ""
    team: str = ""


@dataclass(frozen=True)
class Logins:
    """Every saved login by profile name, and the one used when none is named."""

    profiles: dict[str, Credentials]
    default: str | None


def credentials_path(environ: Mapping[str, str] = os.environ) -> Path:
    """The credentials file: ``$CORRAL_CONFIG``, else ``~/.config/corral/credentials.json``."""
    given = environ.get(CONFIG_ENV)
    return Path(given) if given else Path.home() / ".config" / "corral" / "credentials.json"


def check_profile_name(name: str) -> str:
    if not PROFILE_NAME.fullmatch(name):
        raise ServiceError(f"--profile: '{name}' is not a profile name (letters, digits, _.@-)")
    return name


def load_logins(path: Path) -> Logins:
    """The saved logins; none if there is no file yet. A file of the older one-login format
    (``url`` and ``token`` at the top) reads as one profile named ``default``."""
    try:
        data = json.loads(path.read_text())
        if "profiles" not in data:
            old = Credentials(url=str(data["url"]), token=str(data["token"]))
            return Logins({"default": old}, "default")
        profiles = {
            str(name): Credentials(
                url=str(p["url"]),
                token=str(p["token"]),
                user=str(p.get("user", "")),
                team=str(p.get("team", "")),
            )
            for name, p in data["profiles"].items()
        }
        default = data.get("default")
        return Logins(profiles, str(default) if default in profiles else None)
    except FileNotFoundError:
        return Logins({}, None)
    except OSError as exc:
        raise ServiceError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ServiceError(
            f"{path} is not a corral credentials file: log in again with corral login URL"
        ) from None


def load_credentials(path: Path, profile: str | None = None) -> Credentials:
    """The login saved as `profile`, or the default one; a `ServiceError` that says what
    to type when there is none."""
    logins = load_logins(path)
    name = profile or logins.default
    if name is None or not logins.profiles:
        raise ServiceError("not logged in: corral login URL")
    if name not in logins.profiles:
        saved = ", ".join(sorted(logins.profiles))
        raise ServiceError(f"no login saved as '{name}' (saved: {saved}): corral login URL")
    return logins.profiles[name]


def save_credentials(creds: Credentials, path: Path, profile: str) -> None:
    """Save `creds` as `profile`, the default from now on, beside the other logins; the
    file is readable by its owner only (0600) and replaced at once, never half written."""
    logins = load_logins(path)
    profiles = {**logins.profiles, check_profile_name(profile): creds}
    data = {
        "default": profile,
        "profiles": {
            name: {"url": c.url, "token": c.token, "user": c.user, "team": c.team}
            for name, c in sorted(profiles.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover tmp file may have had another mode
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def normalize_url(url: str) -> str:
    """``host:8642`` → ``http://host:8642``; no trailing slash."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def portable_spec(spec: AnyJobSpec, base: Path) -> dict[str, Any]:
    """`spec` as the server needs it: the paths a job file holds relative to its own folder
    (`base`) made absolute, because the server runs the job in a folder of its own.

    Those are the file of a ``file.py:fn`` entrypoint, loss or estimator, the data, the
    validation data and ``resume_from``. Module references (``pkg.mod:fn``) stay as they are: the
    server must be able to import them. Fields the file left out stay out.
    """

    def absolute(path: str) -> str:
        return str(Path(path) if Path(path).is_absolute() else (base / path).resolve())

    def reference(ref: str) -> str:
        target, sep, attr = ref.rpartition(":")
        return f"{absolute(target)}:{attr}" if sep and target.endswith(".py") else ref

    data = spec.model_dump(mode="json", exclude_unset=True) | {"kind": spec.kind}
    for name in ("entrypoint", "loss", "estimator"):
        if name in data:
            data[name] = reference(data[name])
    data["data"]["path"] = absolute(spec.data.path)
    if spec.validation is not None:
        data["validation"]["path"] = absolute(spec.validation.path)
    if getattr(spec, "resume_from", None) is not None:
        data["resume_from"] = absolute(str(data["resume_from"]))
    return data


def _detail(response: httpx.Response) -> str:
    """The server's reason: FastAPI's ``detail``, a string or a list of field errors."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(detail, list):  # request validation: [{"loc": [...], "msg": ...}, ...]
        parts = []
        for item in detail:
            loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
            parts.append(f"{'.'.join(loc) or 'request'}: {item.get('msg', item)}")
        return "; ".join(parts)
    return str(detail) if detail is not None else response.reason_phrase


class Client:
    """Calls the service's REST API as one user; each method is one route of `api.py`.

    Args:
        url: The server, e.g. ``http://127.0.0.1:8642``.
        token: The user's token (``crl_…``), sent as ``Authorization: Bearer``.
        timeout: Seconds to wait for an answer (connecting waits at most 5).
        transport: An httpx transport to use instead of the network (tests).
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self._http = httpx.Client(
            base_url=f"{self.url}/api",
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=transport,
        )

    @classmethod
    def from_credentials(cls, creds: Credentials) -> Client:
        return cls(creds.url, creds.token)

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the routes ---------------------------------------------------------------------

    def me(self) -> Me:
        return self._call(Me, "GET", "/me")

    def mlflow_login(self) -> MlflowLogin:
        """Where your team's runs are, and a new login of your own that reads them."""
        return self._call(MlflowLogin, "POST", "/me/mlflow")

    def submit(
        self,
        spec: dict[str, Any],
        *,
        priority: int = 0,
        preemptible: bool = False,
        expected_runtime_s: float | None = None,
        client_key: str | None = None,
    ) -> JobOut:
        """Queue a job. A connection error is retried once with the same `client_key`, so a
        submission whose answer was lost is still stored once."""
        body = {
            "spec": spec,
            "priority": priority,
            "preemptible": preemptible,
            "expected_runtime_s": expected_runtime_s,
            "client_key": client_key or uuid.uuid4().hex,
        }
        try:
            return self._call(JobOut, "POST", "/jobs", json=body)
        except _Unreachable:
            time.sleep(RETRY_PAUSE_S)
            return self._call(JobOut, "POST", "/jobs", json=body)

    def jobs(
        self,
        *,
        states: list[str] | None = None,
        user: str | None = None,
        all_states: bool = False,
    ) -> list[JobOut]:
        params: dict[str, Any] = {"all_states": all_states}
        if states:
            params["state"] = states
        if user:
            params["user"] = user
        return self._call(list[JobOut], "GET", "/jobs", params=params)

    def job(self, job_id: str) -> JobDetail:
        return self._call(JobDetail, "GET", f"/jobs/{_segment(job_id)}")

    def logs(self, job_id: str, after: int = 0) -> LogPage:
        return self._call(LogPage, "GET", f"/jobs/{_segment(job_id)}/logs", params={"after": after})

    def save_checkpoint(self, job_id: str, path: Path) -> str:
        """Download the job's newest checkpoint (its final one once it has ended) to
        `path`, whole or not at all; returns its file name on the server."""
        response = self._send("GET", f"/jobs/{_segment(job_id)}/checkpoint", stream=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            with tmp.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
            os.replace(tmp, path)
        except httpx.HTTPError as exc:
            raise ServiceError(
                f"lost the connection to {self.url} while downloading ({type(exc).__name__}): "
                "try again"
            ) from None
        except OSError as exc:
            raise ServiceError(f"cannot write {path}: {exc.strerror}") from None
        finally:
            response.close()
            tmp.unlink(missing_ok=True)
        disposition = response.headers.get("content-disposition", "")
        named = re.search(r'filename="?([^";]+)"?', disposition)
        return named[1] if named else path.name

    def cancel(self, job_id: str) -> JobOut:
        return self._call(JobOut, "POST", f"/jobs/{_segment(job_id)}/cancel")

    def quota(self) -> QuotaOut:
        return self._call(QuotaOut, "GET", "/quota")

    def start_search(self, request: dict[str, Any]) -> SearchDetail:
        """Start a search (``{"spec", "space", "settings"}``); the same one again (name
        and request) answers the search it started, so a retry starts it once."""
        try:
            return self._call(SearchDetail, "POST", "/searches", json=request)
        except _Unreachable:
            time.sleep(RETRY_PAUSE_S)
            return self._call(SearchDetail, "POST", "/searches", json=request)

    def searches(self) -> list[SearchOut]:
        return self._call(list[SearchOut], "GET", "/searches")

    def search(self, search_id: str) -> SearchDetail:
        return self._call(SearchDetail, "GET", f"/searches/{_segment(search_id)}")

    def cancel_search(self, search_id: str) -> SearchOut:
        return self._call(SearchOut, "POST", f"/searches/{_segment(search_id)}/cancel")

    def teams(self) -> list[str]:
        return self._call(list[str], "GET", "/admin/teams")

    def add_team(self, name: str) -> list[str]:
        return self._call(list[str], "POST", "/admin/teams", json={"name": name})

    def users(self) -> list[Me]:
        return self._call(list[Me], "GET", "/admin/users")

    def add_user(self, name: str, team: str, *, admin: bool = False) -> NewUser:
        body = {"name": name, "team": team, "admin": admin}
        return self._call(NewUser, "POST", "/admin/users", json=body)

    def set_quota(
        self, team: str, *, cpus: float | None, memory_mib: int | None, gpus: int | None
    ) -> QuotaOut:
        """Replace `team`'s caps; a cap left ``None`` is removed (that resource uncapped)."""
        body = {"cpus": cpus, "memory_mib": memory_mib, "gpus": gpus}
        return self._call(QuotaOut, "PUT", f"/admin/quotas/{_segment(team)}", json=body)

    # -- one request ----------------------------------------------------------------------

    def _call(self, shape: Any, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; its JSON answer validated as `shape`, or a `ServiceError`."""
        response = self._send(method, path, **kwargs)
        try:
            return TypeAdapter(shape).validate_json(response.content)
        except ValidationError:
            raise ServiceError(
                f"{self.url} answered {method} {path} with something else than a corral "
                "server would: is it one, of this version?"
            ) from None

    def _send(
        self, method: str, path: str, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """Send one request; its answer if it is not an error (with `stream`, its body
        still to read), or a `ServiceError` that says why."""
        try:
            request = self._http.build_request(method, path, **kwargs)
            response = self._http.send(request, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise _Unreachable(
                f"cannot reach the corral server at {self.url}: is it running?"
            ) from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise _Unreachable(
                f"lost the connection to the corral server at {self.url} "
                f"({type(exc).__name__}): try again"
            ) from None
        except httpx.TimeoutException:
            raise ServiceError(
                f"the corral server at {self.url} did not answer in time: try again"
            ) from None
        except httpx.HTTPError as exc:  # a malformed URL, an unsupported scheme, …
            raise ServiceError(f"cannot talk to {self.url}: {exc}") from None
        if response.is_error:
            response.read()
            response.close()
        if response.status_code == 401:
            raise ServiceError(f"not logged in or token not valid: corral login {self.url}")
        if response.is_error:
            detail, code = _detail(response), response.status_code
            if code >= 500:
                detail = f"the corral server at {self.url} failed ({code}): {detail}"
            elif detail == "Not Found":  # no such route: not a corral server, or another version
                detail = f"{self.url}{response.request.url.path}: not found; is it a corral server?"
            raise ServiceError(detail)
        return response


class _Unreachable(ServiceError):
    """No answer came: the server is down, or the connection broke. Safe to retry only
    where the request is idempotent or carries a client key."""


def _segment(value: str) -> str:
    """`value` as one path segment: an id typed with a ``/`` or ``?`` stays inside it."""
    return quote(value, safe="")
