"""What a process of a job knows about itself, parsed from its environment once.

`corral.context()` returns the `Context` of the current process: rank, world size and
device, whether it joins a running job or restores a restarted helper, where checkpoints
go, the address it serves on, the job's rendezvous store, and its line to the driver.
`Context.from_env` is the only reader of the variables in `corral.runtime.env`; strategies
and servers ask the context, never the environment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from corral.comm.control import ControlClient
from corral.errors import CorralError, LaunchError
from corral.runtime import checkpoint as ckpt
from corral.runtime import env as names

#: How long a process waits for a key of the job's store (a server's address, say).
STORE_TIMEOUT = timedelta(minutes=5)


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
    #: True for a helper (a parameter server) restarted in place: it restores its state.
    restoring: bool = False
    #: True when the job trains on without lost workers (any survivor may lead).
    elastic: bool = False
    checkpoint_dir: Path | None
    keep_checkpoints: int = 3
    #: The rendezvous store's address, which the driver hosts.
    master: tuple[str, int] | None = None
    #: The address this process serves on, as its peers reach it.
    serving_host: str = "127.0.0.1"
    client: ControlClient | None = field(default=None, repr=False)
    _store: dist.TCPStore | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Context:
        """The context of a process the launcher started, from the variables it set."""
        host, port = env[names.CONTROL].rsplit(":", 1)
        role, rank = env.get(names.ROLE, "worker"), int(env["RANK"])
        key = bytes.fromhex(env[names.CONTROL_KEY])
        checkpoint_dir = env.get(names.CHECKPOINT_DIR)
        return cls(
            role=role,
            rank=rank,
            local_rank=int(env["LOCAL_RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            restart_count=int(env.get(names.RESTART_COUNT, "0")),
            joining=env.get(names.JOINING) == "1",
            restoring=env.get(names.RESTORE) == "1",
            elastic=env.get(names.ELASTIC) == "1",
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
            keep_checkpoints=int(env.get(names.KEEP_CHECKPOINTS, "3")),
            master=(env["MASTER_ADDR"], int(env["MASTER_PORT"])),
            serving_host=env.get(names.HOST) or env["MASTER_ADDR"],
            device_index=int(env.get(names.DEVICE, "0")),
            client=ControlClient((host, int(port)), key, role, rank),
        )

    @property
    def store(self) -> dist.Store:
        """The job's rendezvous store (the driver hosts it): where servers and mailboxes
        publish their addresses. Connected on first use, then shared."""
        if self._store is None:
            if self.master is None:
                raise CorralError("this process was not started by corral: it has no store")
            host, port = self.master
            self._store = dist.TCPStore(host, port, None, False, timeout=STORE_TIMEOUT)
        return self._store

    #: Index of this process's first own GPU among those it sees (`env.DEVICE`).
    device_index: int = 0

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
        return torch.device("cuda", self.device_index)

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
