"""The exceptions corral raises.

Every error a user can cause has its own type and a message that says, in one line of
English, what was wrong and what to do instead, so that the CLI can print it without a
stack trace.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error corral raises on purpose."""


class SpecError(CorralError, ValueError):
    """A job, strategy or data description is invalid; raised before anything starts."""


class DataError(CorralError, ValueError):
    """The training data cannot be used as given (missing columns, NaN, length mismatch…)."""


class CheckpointError(CorralError):
    """A checkpoint cannot be read, or is not a corral checkpoint."""


class LaunchError(CorralError):
    """The workers could not be started (port in use, resources the machine lacks…)."""


class WorkerError(CorralError):
    """A worker failed; carries which one, how, and the traceback it sent back.

    Attributes:
        role: ``worker`` (or another role name).
        rank: The failed worker's rank.
        exc_type: The exception's type name, or ``None`` when a signal or exit code ended it.
        detail: The exception's message, or a description of the signal or exit code.
        remote_traceback: The traceback formatted in the worker, or its last log lines.
    """

    def __init__(
        self,
        *,
        role: str,
        rank: int,
        exc_type: str | None,
        detail: str,
        remote_traceback: str = "",
        restarts: int = 0,
    ) -> None:
        self.role, self.rank, self.exc_type, self.detail = role, rank, exc_type, detail
        self.remote_traceback, self.restarts = remote_traceback, restarts
        super().__init__(self.summary)

    @property
    def summary(self) -> str:
        """One line: ``worker 1 raised ValueError: bad batch``."""
        what = f"raised {self.exc_type}: {self.detail}" if self.exc_type else self.detail
        tail = f" (after {self.restarts} restart(s))" if self.restarts else ""
        return f"{self.role} {self.rank} {what}{tail}"

    def __str__(self) -> str:
        if not self.remote_traceback:
            return self.summary
        return f"{self.summary}\n\n{self.role} {self.rank}:\n{self.remote_traceback.rstrip()}"


class TrainingError(CorralError):
    """Training cannot go on as asked: the loss became NaN, or returned a non-scalar."""
