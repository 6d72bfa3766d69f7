"""How the ``corral`` commands end: corral's own errors as one line, never a stack trace.

Both the training commands (`corral.cli`) and the job service's commands
(`corral.service.commands`) run their work through `guarded`, so every command prints a
failure the same way. It sits below both, so that neither imports the other for it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from corral.errors import CorralError, WorkerError

#: Standard error, where progress, notes and errors go (standard output stays for results).
err = Console(stderr=True)


def print_error(message: str) -> None:
    """``error: message`` on standard error, within the terminal's width: a line too long
    for it goes on under itself, indented, so that it still reads as one (a terminal
    would break it mid-word, and at column 0)."""
    lines = []
    for line in f"error: {message}".splitlines():
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        lines += textwrap.wrap(
            line,
            err.width,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        ) or [""]
    text = "\n".join(lines)
    err.print(Text("error:", style="bold red") + text[len("error:") :], soft_wrap=True)


def guarded(action: Callable[[], Any]) -> Any:
    """Run `action`; print corral's errors as one line and exit 1, Ctrl-C as 130."""
    try:
        return action()
    except WorkerError as exc:
        print_error(exc.summary)
        if exc.remote_traceback:
            err.print(exc.remote_traceback.rstrip(), highlight=False, markup=False)
        raise typer.Exit(1) from None
    except CorralError as exc:
        print_error(str(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted; all workers stopped")
        raise typer.Exit(130) from None
