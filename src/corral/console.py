"""How the ``corral`` commands end: corral's own errors as one line, never a stack trace.

Both the training commands (`corral.cli`) and the job service's commands
(`corral.service.commands`) run their work through `guarded`, so every command prints a
failure the same way. It sits below both, so that neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from corral.errors import CorralError, WorkerError

#: Standard error, where progress, notes and errors go (standard output stays for results).
err = Console(stderr=True)


def guarded(action: Callable[[], Any]) -> Any:
    """Run `action`; print corral's errors as one line and exit 1, Ctrl-C as 130."""
    try:
        return action()
    except WorkerError as exc:
        err.print(f"[bold red]error:[/] {exc.summary}", highlight=False)
        if exc.remote_traceback:
            err.print(exc.remote_traceback.rstrip(), highlight=False, markup=False)
        raise typer.Exit(1) from None
    except CorralError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted; all workers stopped")
        raise typer.Exit(130) from None
