"""What a worker knows about itself: rank, world size, device, and its line to the driver.

`corral.context()` returns the `Context` of the current worker process. It is built from
the environment the launcher sets (the same variables torch.distributed reads, so user
code that reads them directly keeps working) and holds the control connection used by
`report` and by the launcher to return results and errors.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from corral.comm.control import ControlClient
from corral.errors import CorralError, LaunchError
from corral.train import checkpoint as ckpt


@dataclass(kw_only=True)
class Context:
    """The current worker's identity and services.

    Example:
        >>> ctx = corral.context()
        >>> ctx.report(loss=0.3)
        >>> if ctx.rank == 0: ctx.checkpoint({"model": model.state_dict()})
    """

    role: str
    rank: int
    local_rank: int
    world_size: int
    restart_count: int
    #: True for a worker started into a running job in place of a lost one.
    joining: bool = False
    checkpoint_dir: Path | None
    keep_checkpoints: int = 3
    client: ControlClient | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        """The GPU this worker was given, or the CPU; a GPU given but unusable is an error
        rather than a silent fall back to the CPU."""
        if not os.environ.get("CUDA_VISIBLE_DEVICES"):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise LaunchError(
                f"{self.role} {self.rank} was given GPU(s) "
                f"{os.environ['CUDA_VISIBLE_DEVICES']} but CUDA cannot use them here: "
                "check the driver and that the device exists"
            )
        return torch.device("cuda", 0)

    def report(self, **metrics: Any) -> None:
        """Send metrics to the driver, which logs them and shows them in the CLI."""
        if self.client is not None:
            self.client.send({"kind": "report", "time": time.time(), "metrics": metrics})

    def checkpoint(
        self, state: dict[str, Any], index: int | None = None, *, writer: int = 0
    ) -> Path | None:
        """Save `state` as the job's newest checkpoint (rank `writer` only; others get None).

        `index` orders checkpoints (the Trainer uses the epoch); by default it is one more
        than the newest checkpoint's. Restarts after a failure resume from the newest.
        `writer` is 0 unless rank 0 may be gone (the Trainer passes its lowest live rank).
        """
        if self.rank != writer:
            return None
        if self.checkpoint_dir is None:
            raise CorralError("this job has no checkpoint directory")
        if index is None:
            newest = ckpt.latest(self.checkpoint_dir)
            index = 1 if newest is None else int(newest.stem.split("-")[1]) + 1
        return ckpt.save(self.checkpoint_dir, index, state, keep=self.keep_checkpoints)

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint saved by this job (any attempt), or None."""
        if self.checkpoint_dir is None:
            return None
        path = ckpt.latest(self.checkpoint_dir)
        return None if path is None else {**ckpt.load(path), "path": str(path)}


_current: Context | None = None


def set_context(ctx: Context | None) -> None:
    """Install the worker's context; the launcher calls this once per worker process."""
    global _current
    _current = ctx


def context() -> Context:
    """The `Context` of the calling worker; raises outside a corral worker."""
    if _current is None:
        raise CorralError("corral.context() is only available inside a worker started by corral")
    return _current
