"""One operating-system account per team, for a server that runs as root.

Every process of a team's jobs runs as the team's account (`corral-<team>`), so the
kernel keeps teams apart: one team cannot read another's job folders, open the
service's database, or signal another team's processes. The service creates an account
the first time it runs a job of that team (``useradd --system``: no home, no login
shell, a group of its own); an administrator may create it beforehand with any uid.

Jobs of one team share the account: they may read each other's folders, as the team's
members may read each other's jobs through the API.
"""

from __future__ import annotations

import hashlib
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass

from corral.errors import CorralError

#: What `useradd` accepts everywhere, kept short of the 32-character limit.
_PLAIN = re.compile(r"^[a-z0-9_-]{1,20}$")


@dataclass(frozen=True)
class Account:
    """The account a team's processes run as."""

    name: str
    uid: int
    gid: int


def account_name(team: str) -> str:
    """`corral-<team>` for a plain team name; otherwise a sanitized prefix and a hash,
    so that two teams never share an account."""
    if _PLAIN.match(team):
        return f"corral-{team}"
    prefix = re.sub(r"[^a-z0-9_-]", "-", team.lower())[:12]
    return f"corral-{prefix}-{hashlib.sha256(team.encode()).hexdigest()[:6]}"


def ensure(team: str) -> Account:
    """The team's account, created with ``useradd --system`` if it does not exist."""
    name = account_name(team)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise CorralError(
                f"cannot create the account {name} for team {team}: no useradd here; "
                "create it, or start the server with --isolation none"
            ) from None
        done = subprocess.run(
            [
                *(useradd, "--system", "--user-group", "--no-create-home"),
                *("--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"),
                *("--comment", f"corral team {team}", name),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise CorralError(f"useradd {name} failed: {done.stderr.strip()}") from None
        entry = pwd.getpwnam(name)
    return Account(name, entry.pw_uid, entry.pw_gid)


def remove(team: str) -> None:
    """Delete the team's account, if there is one (tests clean up what they created)."""
    name = account_name(team)
    try:
        pwd.getpwnam(name)
    except KeyError:
        return
    subprocess.run(["userdel", name], capture_output=True, check=False)
