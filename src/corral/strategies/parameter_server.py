"""Training through a sharded parameter server: BSP, ASP, SSP and n-softsync in one strategy.

Workers compute gradients; servers (their own processes, started beside the workers) own
the parameters and the optimizer, split by key range (ps-lite, Li et al., OSDI 2014; Angel
splits the same way). The consistency model — when a worker may go on with which values —
is decided by `corral.ps.consistency`; see there for the papers behind each mode. Every
connection is authenticated with the job's CURVE keys, generated afresh for every launch.

Workers share no process group: epoch-end sums and membership go through server 0, so
in ``async``, ``ssp`` and ``softsync`` a worker that dies costs only its share of the
current epoch — the others train on, take over its data from the next epoch, and a
successor (if ``max_restarts`` allows one) joins from the servers' current values.
The epoch-end meeting after a loss waits for the successor to arrive, so it takes its
share from the next epoch. ``sync`` waits for every worker by definition, so a loss
fails (or restarts) the job.

Choosing: ``sync`` is exact SGD with server-side optimizers; ``ssp`` tolerates transient
stragglers while bounding how stale values get; ``async`` and ``softsync`` never wait,
which pays off with persistent stragglers, and want ``lr_scaling="staleness"`` with more
than a few workers.
"""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, PrivateAttr
from torch.utils.hooks import RemovableHandle

from corral.comm.curve import JobKeys
from corral.engines.base import Resources
from corral.errors import SpecError
from corral.ps.client import PSClient
from corral.ps.consistency import Mode
from corral.ps.layout import Layout
from corral.ps.server import ADDRESS_KEY, ServerConfig, serve
from corral.strategies.base import StepResult, Strategy
from corral.train.context import Context
from corral.train.roles import Role

_SPARSE = (torch.nn.Embedding, torch.nn.EmbeddingBag)


class _Parameters:
    """The model as the servers hold it: one flat dense vector, plus the weight tables of
    embeddings built with ``sparse=True``, which move as touched rows only."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.sparse: list[torch.nn.Embedding | torch.nn.EmbeddingBag] = [
            m for m in model.modules() if isinstance(m, _SPARSE) and m.sparse
        ]
        if any(m.weight.device.type != "cpu" for m in self.sparse):
            raise SpecError(
                "ParameterServer: sparse embedding tables (sparse=True) train on the CPU "
                "only; run this job without GPUs, or make the embedding dense"
            )
        tables = {id(m.weight) for m in self.sparse}
        self.dense = [p for p in model.parameters() if id(p) not in tables]

    def tables(self) -> list[np.ndarray]:
        """Writable views of the tables: the client writes pulled rows straight in."""
        return [m.weight.detach().numpy() for m in self.sparse]

    def values(self) -> np.ndarray:
        return torch.nn.utils.parameters_to_vector(self.dense).detach().cpu().numpy().copy()

    def load(self, values: np.ndarray) -> None:
        """Set the dense parameters, on whatever device they live (a GPU's too)."""
        device = self.dense[0].device if self.dense else torch.device("cpu")
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(values).to(device), self.dense)

    def grads(self) -> np.ndarray:
        grads = [
            torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
            for p in self.dense
        ]
        return torch.cat(grads).cpu().numpy()

    def row_grads(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per table, the rows this step touched and their gradient rows."""
        out = []
        for m in self.sparse:
            grad = m.weight.grad
            if grad is None:
                out.append((np.empty(0, np.int64), np.empty((0, m.weight.shape[1]), np.float32)))
            else:
                grad = grad.coalesce()
                out.append((grad.indices()[0].numpy(), grad.values().numpy()))
        return out


class ParameterServer(Strategy):
    """Workers push gradients to, and pull parameters from, `servers` server processes.

    Example:
        >>> corral.ParameterServer(mode="ssp", servers=2, staleness=3,
        ...                        optimizer="sgd", optimizer_args={"lr": 0.05})
    """

    needs_optimizer: ClassVar[bool] = False
    uses_process_group: ClassVar[bool] = False

    kind: Literal["ps"] = "ps"
    mode: Mode = "sync"
    servers: int = Field(1, ge=1, description="parameter shards, each its own process")
    staleness: int = Field(0, ge=0, description="ssp: most clocks a worker may run ahead")
    quorum: int = Field(1, ge=1, description="softsync: gradients averaged per update")
    lr_scaling: Literal["staleness"] | None = None
    optimizer: Literal["sgd", "adam"] = "sgd"
    optimizer_args: dict[str, float] = Field(default_factory=lambda: {"lr": 0.05})
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="save each shard every this many updates; a killed server is then "
        "restarted from it (counts against max_restarts) instead of failing the attempt",
    )

    _keys: JobKeys | None = PrivateAttr(default=None)
    _client: PSClient | None = PrivateAttr(default=None)
    _layout: Layout | None = PrivateAttr(default=None)
    _model: torch.nn.Module | None = PrivateAttr(default=None)
    _params: _Parameters = PrivateAttr()
    _hooks: list[RemovableHandle] = PrivateAttr(default_factory=list)

    def prepare_job(self, *, workers: int, resources: Resources) -> list[Role]:
        if self.mode == "softsync" and self.quorum > workers:
            raise SpecError(
                f"strategy.quorum: {self.quorum} is more than the {workers} workers; "
                "a softsync update could never complete"
            )
        self._keys = JobKeys.generate()
        config = ServerConfig(
            mode=self.mode,
            workers=workers,
            staleness=self.staleness,
            quorum=self.quorum,
            lr_scaling=self.lr_scaling,
            optimizer=self.optimizer,
            optimizer_args=dict(self.optimizer_args),
            checkpoint_every=self.checkpoint_every,
        )
        return [
            Role(
                name="server",
                count=self.servers,
                fn=serve,
                args=(config, self._keys),
                resources=resources,
                restartable=self.checkpoint_every is not None,
            )
        ]

    def _addresses(self, store: dist.Store) -> list[str]:
        """Where the servers listen, as they published it (waits for them to start)."""
        return [store.get(ADDRESS_KEY.format(i)).decode() for i in range(self.servers)]

    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context
    ) -> torch.nn.Module:
        if self._keys is None:
            raise SpecError("the parameter server strategy must be launched by corral")
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            None,
            False,
            timeout=timedelta(minutes=5),
        )
        self._client = PSClient(self._addresses(store), self._keys, ctx.rank, store=store)
        params = self._params = _Parameters(model)
        values, tables = params.values(), params.tables()
        self._layout = Layout.split(values.size, self.servers, [len(t) for t in tables])
        params.load(self._client.init(values, self._layout, tables))
        self._hooks = [
            m.register_forward_pre_hook(functools.partial(self._pull_rows, t))
            for t, m in enumerate(params.sparse)
        ]
        self._model = model
        return model

    def _pull_rows(self, table: int, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """Before an embedding runs: fetch the current values of the rows it will read."""
        assert self._client is not None and self._layout is not None
        rows = torch.unique(args[0]).cpu().numpy()
        wanted = [rows if t == table else rows[:0] for t in range(len(self._layout.rows))]
        values = self._client.rows(self._layout, wanted)[table]
        self._params.sparse[table].weight.detach().numpy()[rows] = values

    def step(self, loss: torch.Tensor) -> StepResult:
        assert self._model is not None and self._client is not None and self._layout
        params = self._params
        self._model.zero_grad(set_to_none=True)
        loss.backward()
        params.load(self._client.step(params.grads(), self._layout, params.row_grads()))
        return StepResult(synced=True)

    def finish_epoch(self) -> None:
        assert self._model is not None and self._client is not None and self._layout
        self._params.load(self._client.pull(self._layout, self._params.tables()))

    def tolerates_worker_loss(self) -> bool:
        return self.mode != "sync"

    def _tell_servers(
        self, store: dist.Store, lost: list[tuple[int, int | None]]
    ) -> dict[str, Any]:
        """Caller side: report lost workers to every server; server 0's account of the last."""
        keys = [ADDRESS_KEY.format(i) for i in range(self.servers)]
        if self._keys is None or not store.check(keys):
            return {}  # lost before the servers were up: nobody waits for it yet
        client = PSClient(self._addresses(store), self._keys, worker=-1, timeout_s=30.0)
        try:
            return [client.lost(rank, successor) for rank, successor in lost][-1]
        finally:
            client.close()

    def helper_restarted(self, role: str, rank: int, lost: list[int], store: dist.Store) -> None:
        """A restored server may remember workers lost since its checkpoint: tell it again."""
        if lost:
            self._tell_servers(store, [(r, None) for r in lost])

    def worker_lost(self, rank: int, successor: int | None, store: dist.Store) -> dict[str, Any]:
        done = self._tell_servers(store, [(rank, successor)])
        if not done:
            return {}  # it had not started an epoch
        steps, samples, steps_done = done["steps"], done["samples"], done["steps_done"]
        base, extra = divmod(samples, steps)  # batches are near-equal, larger ones first
        trained = steps_done * base + min(steps_done, extra)
        return {
            "epoch": done["epoch"] + 1,
            "steps_done": steps_done,
            "steps": steps,
            "samples_not_trained": samples - trained,
        }

    def join(self) -> tuple[int, list[int]] | None:
        assert self._model is not None and self._client is not None and self._layout
        reply = self._client.join()
        if reply.get("finished"):
            return None
        self._params.load(self._client.pull(self._layout, self._params.tables()))  # of now
        return reply["epoch"], reply["members"]

    def begin_epoch(self, epoch: int, *, steps: int, samples: int) -> None:
        assert self._client is not None
        self._client.begin_epoch(epoch, steps=steps, samples=samples)

    def epoch_end(self, epoch: int, sums: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        assert self._client is not None
        totals, members = self._client.meet(epoch, sums.cpu().numpy())
        return torch.from_numpy(totals).to(sums.device), members

    def epoch_metrics(self) -> dict[str, Any]:
        """The servers' staleness histogram and bytes moved per second (on every worker,
        since whichever is lowest-ranked and alive reports them)."""
        if self._client is None:
            return {}
        stats = self._client.stats()
        # every shard sees every gradient; shard 0's view counts each gradient once
        histogram = {int(k): v for k, v in stats[0]["histogram"].items()}
        count = sum(histogram.values()) or 1
        return {
            "staleness_mean": sum(k * v for k, v in histogram.items()) / count,
            "staleness_max": float(max(histogram, default=0)),
            "staleness_histogram": histogram,
            "server_updates": float(stats[0]["updates"]),  # every shard sees every update
            "server_mb_per_s": sum(s["bytes"] / s["seconds"] for s in stats) / 1e6,
            "server_bytes": float(sum(s["bytes"] for s in stats)),  # since the job started
            "server_lost_updates": float(sum(s["lost_updates"] for s in stats)),
        }

    def finish(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._client is not None:
            self._client.leave()
            self._client.close()
            self._client = None
