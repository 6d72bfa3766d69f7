"""The entry point of every worker process: ``python -m corral.train.worker PAYLOAD``.

It arms the parent watchdog, builds the `Context` from the environment the launcher set,
runs the user's function, and sends rank 0's return value — or any worker's exception
with its traceback — to the driver over the authenticated control channel, never stdout.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import cloudpickle
import torch.distributed as dist

from corral.engines.watchdog import watch_parent
from corral.errors import CorralError
from corral.runtime import env as names
from corral.runtime.context import Context, set_context

#: Phrases of errors a worker gets only because a *peer* died (gloo and NCCL word them so).
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crash",
    "Broken pipe",
    "NCCL communicator was aborted",
)


def _is_echo_of_peer(exc: BaseException) -> bool:
    """True for communication errors that only report another worker's failure."""
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(p in str(exc) for p in _PEER_LOST)
    )


def _error_message(exc: BaseException) -> dict[str, Any]:
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next  # the user's frames are what matter, not this launcher's
    return {
        "kind": "error",
        "time": time.time(),
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
        "deterministic": isinstance(exc, CorralError),
        "secondary": _is_echo_of_peer(exc),
    }


def _leave_process_group() -> None:
    """Destroy a process group the user's code left open.

    Exiting with live gloo/DDP threads can abort the interpreter at shutdown ("terminate
    called without an active exception", SIGABRT) after the work succeeded.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(payload_path: str) -> int:
    """Run one worker; returns the process exit code."""
    watch_parent()
    ctx = Context.from_env(os.environ)
    os.environ.pop(names.CONTROL_KEY)  # the user's code has no use for the job's key
    assert ctx.client is not None
    set_context(ctx)
    try:
        fn, args = cloudpickle.loads(Path(payload_path).read_bytes())[ctx.role]
        try:
            value = fn(*args)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
            value = None
        _leave_process_group()
        # Rank 0's value is the job's; in a job that outlives lost workers, any rank that
        # returns something may be the lowest survivor, and the driver takes the lowest.
        elastic = ctx.elastic and value is not None
        if ctx.role == "worker" and (ctx.rank == 0 or elastic):
            try:
                blob = cloudpickle.dumps(value)
            except Exception as exc:
                raise CorralError(
                    f"the return value of worker {ctx.rank} cannot be pickled: {exc}"
                ) from exc
            ctx.client.send({"kind": "result", "value": blob})
        return 0
    except SystemExit as exc:
        ctx.client.send(_error_message(exc) | {"message": f"exit code {exc.code}"})
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        ctx.client.send(_error_message(exc))
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        ctx.client.close()


def _exit(code: int) -> None:
    """Run Python's exit handlers, then leave without C++ teardown.

    gloo and DDP keep native threads that may still be joinable when static destructors
    run, which aborts the process ("terminate called without an active exception",
    SIGABRT) after its work succeeded and its result was sent; seen on a loaded 2-core
    machine even after the process group was destroyed. Everything of ours is flushed by
    then, so skipping the C++ teardown loses nothing.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main(sys.argv[1]))
