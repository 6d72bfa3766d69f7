"""The child side of the local engine's no-orphan guarantee.

The local engine hands every child the read end of a pipe whose write end only the caller
holds. `watch_parent` blocks on that pipe in a daemon thread: when the caller exits — even
by SIGKILL, which runs no cleanup — the kernel closes the write end, the read returns,
and the child kills its whole process group. Unlike ``PR_SET_PDEATHSIG`` this does not
fire when the *thread* that spawned the child ends, and it also takes grandchildren.
"""

from __future__ import annotations

import os
import signal
import threading

from corral.engines.local import PARENT_FD_ENV


def _wait_then_kill(fd: int) -> None:
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


def watch_parent() -> None:
    """Start the watchdog if this process was started by the local engine; else do nothing."""
    fd = os.environ.pop(PARENT_FD_ENV, None)
    if fd is None:
        return
    threading.Thread(
        target=_wait_then_kill, args=(int(fd),), name="parent-watch", daemon=True
    ).start()
