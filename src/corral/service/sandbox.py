"""Start a job's process inside its limits, as its team's account: the exec wrapper.

``python -m corral.service.sandbox SPEC -- ARGV…`` runs as root, started by the runner.
It does, in this order, what must be done before the job's own code runs and cannot be
undone by it: join the attempt's cgroups (`corral.service.cgroups`; without them, set
``RLIMIT_AS`` to the grant instead), drop every supplementary group, take the team's gid
and uid, and replace itself with `ARGV` in a clean environment. SPEC is one JSON
argument: ``{uid, gid, procs: [...], rlimit_as: bytes | null, env: {...}, cwd}``.

A wrapper process rather than a ``preexec_fn``: the runner is threaded, and Python
runs ``preexec_fn`` after it has already changed the uid, too late to join a cgroup.
"""

from __future__ import annotations

import json
import os
import resource
import sys


def main(argv: list[str]) -> None:
    spec, rest = json.loads(argv[0]), argv[1:]
    if rest[:1] != ["--"] or len(rest) < 2:
        raise SystemExit("usage: python -m corral.service.sandbox SPEC -- ARGV...")
    command = rest[1:]
    for procs in spec["procs"]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    if spec["rlimit_as"] is not None:
        limit = int(spec["rlimit_as"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.setgroups([])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    os.chdir(spec["cwd"])
    if not os.access(os.path.realpath(command[0]), os.X_OK):
        raise SystemExit(
            f"corral: the team's account (uid {spec['uid']}) cannot run {command[0]}: "
            "install Python and corral where job accounts can read them (not under a "
            "private home such as /root)"
        )
    os.execve(command[0], command, spec["env"])


if __name__ == "__main__":
    main(sys.argv[1:])
