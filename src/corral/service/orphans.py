"""No process the server starts beside itself outlives it, however the server ends.

The API processes it forks (`corral.service.server`) and the guard of the MLflow server
it starts (`corral.service.mlflow_server`) each ask the kernel, first thing, to be sent
SIGTERM when the server ends: a SIGKILLed server runs no clean-up of its own.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger("corral.service")

#: prctl(2)'s option: the signal this process gets when the thread that forked it ends.
_PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> None:
    """Be sent SIGTERM when `parent` ends, however it ends (SIGKILL included: then nothing
    of it could stop this one); Linux only, elsewhere the parent's own stop is all there
    is. The fork must have been made on the parent's main thread, which lives as long as
    the parent."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            errno_ = ctypes.get_errno()
            log.warning("corral server: prctl(PR_SET_PDEATHSIG) failed, errno %d", errno_)
    if os.getppid() != parent:  # it ended before the line above: no signal will come
        os._exit(0)
