"""Each team's runs are readable with its own credentials only: users and permissions on an
MLflow server with the ``basic-auth`` app, made through its REST API as its admin.

MLflow's own per-experiment permissions do the enforcing, on every request, in the one
place the runs are read from (its UI, its REST API, its artifacts): a proxy of corral's in
front of MLflow would have to know which of MLflow's hundred routes reads which
experiment, and would be one more thing to keep in step with MLflow's releases. The
server's experiments are named after the teams (`corral.service.runner`), and with
``default_permission = NO_PERMISSIONS`` (`corral.service.mlflow_server`) a user sees
nothing they were not granted. The users:

* ``team-<team>``, the team's jobs: MANAGE on the team's experiment, so its jobs create,
  log to and end their runs. Its random password is made once and kept in
  ``STATE/mlflow/teams.json`` (0600), where only the runner reads it: in the database it
  would reach every API process, every backup of a PostgreSQL, and every reader of it,
  and a job of the team re-attached after a server restart still holds it. A lost file
  costs nothing: the next job of the team gives the user a new password.
* ``user-<name>``, a person (``corral mlflow-login``): READ on their team's experiment.
  Each login gives a new random password, answered once and kept nowhere by corral: its
  files hold no person's password, and a login replaces the one before.

The prefixes keep a person from ever being named as a team (or as the admin).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from corral.errors import CorralError

#: What a team's jobs may do in its experiment, and what its people may.
JOBS, PEOPLE = "MANAGE", "READ"
#: Seconds MLflow has to answer one request (each hashes the caller's password: PBKDF2).
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Admin:
    """An admin of an MLflow server's basic-auth app."""

    username: str
    password: str = field(repr=False)


class MlflowLogin(BaseModel):
    """Where a team's runs are, and a login that reads them (`POST /api/me/mlflow`). The
    login is ``None`` on an MLflow store without users: there, anyone reads everything."""

    uri: str
    experiment: str
    username: str | None = None
    password: str | None = None


class MlflowAuthError(CorralError):
    """MLflow refused a request of corral's admin (with its HTTP `status`), or did not
    answer (`status` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TeamAccess:
    """Makes the users, experiments and permissions of the module docstring on the MLflow
    server at `uri`, as its `admin`; the teams' passwords are kept in `kept`."""

    def __init__(self, uri: str, admin: Admin, *, kept: Path) -> None:
        self.uri, self.admin, self.kept = uri.rstrip("/"), admin, kept
        self._lock = threading.Lock()
        #: The teams whose user, experiment and permission this process has made sure of.
        self._ready: dict[str, str] = {}

    def check(self) -> None:
        """Refuse an admin that is none: a wrong password, a user without the role, or a
        server without the basic-auth app."""
        name = self.admin.username
        who = f"MLflow user '{name}' at {self.uri}"
        try:
            found = self._call("GET", "2.0/mlflow/users/get", params={"username": name})
        except MlflowAuthError as exc:
            if exc.status == 404 and not isinstance(exc, _Missing):
                raise MlflowAuthError(
                    f"{self.uri} has no users to manage: start MLflow with --app-name basic-auth"
                ) from None
            if exc.status == 401:
                raise MlflowAuthError(f"{who}: MLflow refused its password") from None
            raise
        if not found.get("user", {}).get("is_admin"):
            raise MlflowAuthError(f"{who} is not an admin: corral cannot give teams permissions")

    def team_login(self, team: str) -> dict[str, str]:
        """The MLflow login of `team`'s jobs, as the variables MLflow's client reads."""
        with self._lock:
            password = self._ready.get(team)
            if password is None:
                passwords = self._passwords()
                password = passwords.get(team)
                if password is None:
                    password = passwords[team] = _password()
                    self._keep(passwords)
                username = f"team-{team}"
                self._user(username, password)
                self._grant(username, self.experiment(team), JOBS)
                self._ready[team] = password
        return {"MLFLOW_TRACKING_USERNAME": f"team-{team}", "MLFLOW_TRACKING_PASSWORD": password}

    def person_login(self, name: str, team: str) -> MlflowLogin:
        """A new password for `name`'s own MLflow user, which reads `team`'s experiment."""
        username, password = f"user-{name}", _password()
        self._user(username, password)
        self._grant(username, self.experiment(team), PEOPLE)
        return MlflowLogin(uri=self.uri, experiment=team, username=username, password=password)

    def experiment(self, team: str) -> str:
        """The id of `team`'s experiment, created if it is not there yet."""
        path = "2.0/mlflow/experiments/get-by-name"
        for _ in range(2):  # a job of the team may create it between the two calls
            try:
                found = self._call("GET", path, params={"experiment_name": team})
                return str(found["experiment"]["experiment_id"])
            except _Missing:
                pass
            try:
                made = self._call("POST", "2.0/mlflow/experiments/create", json={"name": team})
                return str(made["experiment_id"])
            except _Exists:
                continue
        raise MlflowAuthError(f"MLflow at {self.uri}: cannot create the experiment '{team}'")

    def _user(self, username: str, password: str) -> None:
        """Make `username` with `password`, or give it that password if it exists."""
        body = {"username": username, "password": password}
        try:
            self._call("POST", "2.0/mlflow/users/create", json=body)
        except _Exists:
            self._call("PATCH", "2.0/mlflow/users/update-password", json=body)

    def _grant(self, username: str, experiment_id: str, permission: str) -> None:
        body = {
            "username": username,
            "resource_type": "experiment",
            "resource_id": experiment_id,
            "permission": permission,
        }
        # granted before: corral grants each user one permission, on one experiment
        with contextlib.suppress(_Exists):
            self._call("POST", "3.0/mlflow/users/permissions/grant", json=body)

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = httpx.request(
                method,
                f"{self.uri}/api/{path}",
                auth=(self.admin.username, self.admin.password),
                timeout=TIMEOUT_S,
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise MlflowAuthError(
                f"MLflow at {self.uri} did not answer ({type(exc).__name__})"
            ) from None
        if response.is_success:
            return dict(response.json()) if response.content else {}
        code, detail = _detail(response)
        error = {"RESOURCE_ALREADY_EXISTS": _Exists, "RESOURCE_DOES_NOT_EXIST": _Missing}
        raise error.get(code, MlflowAuthError)(
            f"MLflow at {self.uri} refused {path} ({response.status_code} {code}): {detail}",
            response.status_code,
        )

    def _passwords(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.kept.read_text()))
        except FileNotFoundError:
            return {}

    def _keep(self, passwords: dict[str, str]) -> None:
        """Write the teams' passwords whole (a kill mid-write leaves the old file), 0600."""
        self.kept.parent.mkdir(parents=True, exist_ok=True)
        partial = self.kept.with_name(f"{self.kept.name}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(passwords))
        os.replace(partial, self.kept)


class _Exists(MlflowAuthError):
    pass


class _Missing(MlflowAuthError):
    pass


def _password() -> str:
    """A random password (192 bits; MLflow asks for 12 characters at least)."""
    return secrets.token_urlsafe(24)


def _detail(response: httpx.Response) -> tuple[str, str]:
    """MLflow's error code and message, from its JSON (or its text: a 401 is plain)."""
    try:
        body = response.json()
        return str(body.get("error_code", "")), str(body.get("message", ""))[:300]
    except (ValueError, AttributeError):
        return "", response.text.strip()[:300]
