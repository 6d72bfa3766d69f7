"""Training through a sharded parameter server: BSP, ASP, SSP and n-softsync in one strategy.

Workers compute gradients; servers (their own processes, started beside the workers) own
the parameters and the optimizer, split by key range (ps-lite, Li et al., OSDI 2014; Angel
splits the same way). The consistency model — when a worker may go on with which values —
is decided in `corral.ps` (one module per mode; see there for the papers behind each).
Every connection is authenticated with the job's CURVE keys, generated afresh for every
launch by `ParameterServer.plan`.

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
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from corral.errors import SpecError
from corral.ps.settings import ServerSettings
from corral.runtime.resources import Resources
from corral.runtime.roles import Role
from corral.strategies.base import (
    Batch,
    LossFn,
    Replica,
    StepResult,
    Strategy,
    StrategyPlan,
    Supervisor,
    checked_loss,
)

# torch, NumPy, ZeroMQ and the server and client are imported in plan() and where workers
# run: the spec reads `ParameterServer` without them.
if TYPE_CHECKING:
    import numpy as np
    import torch
    import torch.distributed as dist

    from corral.comm.curve import JobKeys
    from corral.runtime.context import Context


class _Parameters:
    """The model as the servers hold it: one flat dense vector, plus the weight tables of
    embeddings built with ``sparse=True``, which move as touched rows only."""

    def __init__(self, model: torch.nn.Module) -> None:
        import torch

        sparse = (torch.nn.Embedding, torch.nn.EmbeddingBag)
        self.sparse: list[torch.nn.Embedding | torch.nn.EmbeddingBag] = [
            m for m in model.modules() if isinstance(m, sparse) and m.sparse
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
        import torch

        return torch.nn.utils.parameters_to_vector(self.dense).detach().cpu().numpy().copy()

    def load(self, values: np.ndarray) -> None:
        """Set the dense parameters, on whatever device they live (a GPU's too)."""
        import torch

        device = self.dense[0].device if self.dense else torch.device("cpu")
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(values).to(device), self.dense)

    def grads(self) -> np.ndarray:
        import torch

        grads = [
            torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
            for p in self.dense
        ]
        return torch.cat(grads).cpu().numpy()

    def row_grads(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per table, the rows this step touched and their gradient rows."""
        import numpy as np

        out = []
        for m in self.sparse:
            grad = m.weight.grad
            if grad is None:
                out.append((np.empty(0, np.int64), np.empty((0, m.weight.shape[1]), np.float32)))
            else:
                grad = grad.coalesce()
                out.append((grad.indices()[0].numpy(), grad.values().numpy()))
        return out


class ParameterServer(ServerSettings, Strategy):
    """Workers push gradients to, and pull parameters from, `servers` server processes.

    The servers' settings (mode, staleness, quorum, lr_scaling, optimizer, …) are
    `corral.ps.settings.ServerSettings`'s, inherited, and handed to each server whole.

    Example:
        >>> corral.ParameterServer(mode="ssp", servers=2, staleness=3,
        ...                        optimizer="sgd", optimizer_args={"lr": 0.05})
    """

    needs_optimizer: ClassVar[bool] = False
    uses_process_group: ClassVar[bool] = False

    kind: Literal["ps"] = "ps"
    servers: int = Field(1, ge=1, description="parameter shards, each its own process")

    def plan(self, *, workers: int, helpers: Resources) -> StrategyPlan:
        if self.mode == "softsync" and self.quorum > workers:
            raise SpecError(
                f"strategy.quorum: {self.quorum} is more than the {workers} workers; "
                "a softsync update could never complete"
            )
        from corral.comm.curve import JobKeys
        from corral.ps.server import serve

        keys = JobKeys.generate()
        settings = ServerSettings.model_validate(self.model_dump(include=_SERVER_FIELDS))
        servers = Role(
            name="server",
            count=self.servers,
            fn=serve,
            args=(settings, workers, keys),
            resources=helpers,
            restartable=self.checkpoint_every is not None,
        )
        return StrategyPlan(
            helpers=(servers,),
            keys=keys,
            tolerates_worker_loss=self.mode != "sync",  # sync waits for every worker
            supervisor=_Supervisor(self.servers, keys),
        )

    def build(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss: LossFn,
        ctx: Context,
        plan: StrategyPlan,
    ) -> _PSReplica:
        if plan.keys is None:
            raise SpecError("the parameter server strategy must be launched by corral")
        return _PSReplica(self.servers, plan.keys, model, loss, ctx)


#: The fields a server is handed: the settings, not the strategy's own (kind, servers).
_SERVER_FIELDS = set(ServerSettings.model_fields)


def _addresses(store: dist.Store, servers: int) -> list[str]:
    """Where the servers listen, as they published it (waits for them to start)."""
    from corral.ps.server import ADDRESS_KEY

    return [store.get(ADDRESS_KEY.format(i)).decode() for i in range(servers)]


class _Supervisor(Supervisor):
    """Caller side: tells the servers about lost workers (async, ssp and softsync)."""

    def __init__(self, servers: int, keys: JobKeys) -> None:
        self.servers, self.keys = servers, keys

    def _tell_servers(
        self, store: dist.Store, lost: list[tuple[int, int | None]]
    ) -> dict[str, Any]:
        """Report lost workers to every server; server 0's account of the last."""
        from corral.ps.client import PSClient
        from corral.ps.server import ADDRESS_KEY

        keys = [ADDRESS_KEY.format(i) for i in range(self.servers)]
        if not store.check(keys):
            return {}  # lost before the servers were up: nobody waits for it yet
        client = PSClient(_addresses(store, self.servers), self.keys, worker=-1, timeout_s=30.0)
        try:
            return [client.lost(rank, successor) for rank, successor in lost][-1]
        finally:
            client.close()

    def helper_restarted(self, role: str, rank: int, lost: list[int], store: dist.Store) -> None:
        """A restored server may remember workers lost since its checkpoint: tell it again."""
        if lost:
            self._tell_servers(store, [(r, None) for r in lost])

    def worker_lost(self, rank: int, successor: int | None, store: dist.Store) -> dict[str, Any]:
        from corral.runtime.membership import untrained

        return untrained(self._tell_servers(store, [(rank, successor)]))


class _PSReplica(Replica):
    """A worker: forward and backward here, the update on the servers."""

    def __init__(
        self, servers: int, keys: JobKeys, model: torch.nn.Module, loss: LossFn, ctx: Context
    ) -> None:
        from corral.ps.client import PSClient
        from corral.ps.layout import Layout

        self.model, self.loss, self.rank = model, loss, ctx.rank
        self.client = PSClient(_addresses(ctx.store, servers), keys, ctx.rank, store=ctx.store)
        self.params = params = _Parameters(model)
        values, tables = params.values(), params.tables()
        self.layout = Layout.split(values.size, servers, [len(t) for t in tables])
        params.load(self.client.init(values, self.layout, tables))
        self.hooks = [
            m.register_forward_pre_hook(functools.partial(self._pull_rows, t))
            for t, m in enumerate(params.sparse)
        ]

    def _pull_rows(self, table: int, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """Before an embedding runs: fetch the current values of the rows it will read."""
        import torch

        rows = torch.unique(args[0]).cpu().numpy()
        wanted = [rows if t == table else rows[:0] for t in range(len(self.layout.rows))]
        values = self.client.rows(self.layout, wanted)[table]
        self.params.sparse[table].weight.detach().numpy()[rows] = values

    def step(self, batch: Batch) -> StepResult:
        out = self.model(batch.x)
        loss = self.loss(out, batch.y)
        value = checked_loss(loss, batch, self.rank)
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        params = self.params
        params.load(self.client.step(params.grads(), self.layout, params.row_grads()))
        return StepResult(output=out.detach(), loss=value, synced=True)

    def sync(self) -> None:
        self.params.load(self.client.pull(self.layout, self.params.tables()))

    def join(self) -> tuple[int, list[int]] | None:
        reply = self.client.join()
        if reply.get("finished"):
            return None
        self.sync()  # the servers' values of now
        return reply["epoch"], reply["members"]

    def begin_epoch(self, epoch: int, *, steps: int, samples: int) -> None:
        self.client.begin_epoch(epoch, steps=steps, samples=samples)

    def meet(self, epoch: int, sums: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        import torch

        totals, members = self.client.meet(epoch, sums.cpu().numpy())
        return torch.from_numpy(totals).to(sums.device), members

    def metrics(self) -> dict[str, Any]:
        """The servers' staleness histogram and bytes moved per second (on every worker,
        since whichever is lowest-ranked and alive reports them)."""
        stats = self.client.stats()
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

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.client.leave()
        self.client.close()
