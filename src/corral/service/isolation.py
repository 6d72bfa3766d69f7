"""How the runner keeps jobs apart: team accounts and kernel limits, or one-user mode.

A job is its user's own Python. On a server started as root (the production set-up)
every job process runs as its team's account (`corral.service.accounts`) with no
supplementary groups, in a clean environment, in a job folder only that account may
enter (0700), inside cgroup limits of the memory and CPUs the scheduler granted
(`corral.service.cgroups`; ``RLIMIT_AS`` where there are none). The server's own files
(database, other jobs' folders) are its account's, created private (umask 077).

Without root none of that is possible: the server still runs jobs, as its own user, and
says so on its first line and on the cluster page (one-user mode).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corral.errors import CorralError

Mode = Literal["auto", "accounts", "none"]

#: What a job process keeps of the server's environment: where programs are, the locale,
#: and where Java, Spark and Hadoop live. Nothing else (no database URL, no secrets).
PASSED_ON = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "JAVA_HOME",
    "SPARK_HOME",
    "SPARK_CONF_DIR",
    "HADOOP_CONF_DIR",
    "YARN_CONF_DIR",
    "PYSPARK_PYTHON",
    "PYSPARK_DRIVER_PYTHON",
)

ONE_USER_WARNING = (
    "one-user mode: jobs run as this server's user and are not isolated from each other "
    "(start the server as root for team accounts and enforced limits)"
)


@dataclass(frozen=True)
class Isolation:
    """Whether jobs run as their team's account, inside enforced limits."""

    accounts: bool

    @classmethod
    def choose(cls, mode: Mode) -> Isolation:
        """``auto``: accounts when the server runs as root with ``useradd``; ``none``:
        one-user mode; ``accounts``: accounts, or an error saying why not."""
        able = os.geteuid() == 0 and shutil.which("useradd") is not None
        if mode == "accounts" and not able:
            raise CorralError(
                "--isolation accounts needs the server to run as root, with useradd "
                "(to run each team's jobs as the team's own account)"
            )
        return cls(accounts=able and mode != "none")

    @property
    def warning(self) -> str | None:
        """What the server says on its first line and cluster page, if anything."""
        return None if self.accounts else ONE_USER_WARNING

    def prepare_state(self, state_dir: Path) -> None:
        """Make the server's files private and let job accounts reach only their own
        folder: umask 077; the state and jobs folders 0711 (enter, not list)."""
        if not self.accounts:
            return
        os.umask(0o077)
        jobs = state_dir / "jobs"
        jobs.mkdir(parents=True, exist_ok=True)
        for folder in (state_dir, jobs):
            folder.chmod(0o711)


def clean_env(home: Path) -> dict[str, str]:
    """A job process's environment: `PASSED_ON` from the server's, and `home` as HOME."""
    env = {name: os.environ[name] for name in PASSED_ON if name in os.environ}
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1"}


def give(folder: Path, uid: int, gid: int) -> None:
    """Hand `folder` and everything in it to the account, private to it (0700)."""
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), uid, gid)
    os.chown(folder, uid, gid)
    folder.chmod(0o700)
