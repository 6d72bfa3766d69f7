"""Federated averaging: clients train the shared model on their own data; the mean moves it.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (AISTATS 2017), Algorithm 1. Each round (an epoch of the job) samples
``max(min_clients, fraction × clients)`` clients, seeded; each trains the global model for
`local_epochs` epochs of mini-batches (the job's ``batch_size``: B) on its own samples and
reports the change it made and its sample count; the global model moves by the
sample-weighted mean of the changes (times ``server_lr``, 1 in the paper). FedSGD is the
special case of one local epoch with a batch at least as large as any client's data.

**Simulation**: the job's workers are a bounded pool, not a process per client. Every
worker holds the data and computes the same partition (`corral.federated.partition`) and
the same sample of clients; worker *r* trains every W-th sampled client, one after the
other, from the same global weights; one all-reduce per round sums the weighted updates
(or, for a robust `aggregate` rule, one all-gather collects them), and every worker applies
the same server step, so all hold one global model without a server process. Memory is the
pool's (each worker: the data, the model, one client's update at a time with the mean), not
the client count's.

Variants subclass `FedAvg` and override one of its two worker-side hooks: `FedProx`
the local gradient (``penalise``), `FedOpt` the server step (``server_step``). `FedBuff`
replaces the round's choice of clients (``FederatedReplica.round_clients``): which ones
finish, from which past global weights each started, and how much each counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from corral.federated.aggregation import AnyAggregation, Mean
from corral.federated.partition import IID, AnyPartition
from corral.federated.privacy import Privacy
from corral.federated.secure import SecureAggregation
from corral.strategies.base import (
    LossFn,
    RoundReplica,
    RoundTotals,
    Strategy,
    StrategyPlan,
)
from corral.strategies.local_update import LocalTraining, Totals

if TYPE_CHECKING:
    import numpy as np
    import torch

    from corral.data import Source
    from corral.runtime.context import Context

#: Seconds between two progress reports of a round from its leading worker.
PROGRESS_EVERY_S = 0.5


class FedAvg(Strategy):
    """Federated averaging over `clients` simulated clients.

    Example:
        >>> trainer = corral.Trainer(
        ...     model=lambda: torch.nn.Linear(64, 10), loss=torch.nn.CrossEntropyLoss(),
        ...     optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        ...     strategy=corral.FedAvg(clients=100, fraction=0.1, local_epochs=5,
        ...                            partition=corral.federated.LabelShards(shards=2)),
        ...     workers=2, epochs=50, batch_size=10)

    Attributes:
        clients: How many clients the training data is split into.
        fraction: C, the fraction of clients sampled each round.
        min_clients: The fewest clients a round samples, whatever the fraction.
        local_epochs: E, epochs each sampled client trains on its own data.
        partition: How the data is split into clients (`corral.federated.partition`);
            with `corral.federated.ClientColumn`, one client per distinct value of a
            column, and `clients` must be their number.
        aggregate: The rule that combines the updates (`corral.federated.aggregation`):
            the sample-weighted mean, or a robust one.
        server_lr: The global model moves by this times the aggregate.
        dropout: Simulation only: the fraction of sampled clients that fail to report
            (seeded), as real devices do.
        privacy: DP-FedAvg (`corral.federated.privacy`): each update clipped to
            ``clip``, Gaussian noise on their sum (or on each, ``mode="local"``),
            the mean over the *expected* clients; every round's ε at δ in the history,
            and training ends before a round would pass ``max_epsilon``. With it,
            clients weigh the same whatever their sample counts (the sensitivity of a
            sample-weighted mean would be unbounded).
        secure: Secure aggregation (`corral.strategies.secure_round`): the server side
            learns only the sum of the quantised updates; clients weigh the same.
    """

    kind: Literal["fedavg"] = "fedavg"
    clients: int = Field(ge=1)
    fraction: float = Field(default=0.1, gt=0, le=1)
    min_clients: int = Field(default=1, ge=1)
    local_epochs: int = Field(default=1, ge=1)
    partition: AnyPartition = Field(default_factory=IID)
    aggregate: AnyAggregation = Field(default_factory=Mean)
    server_lr: float = Field(default=1.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    privacy: Privacy | None = None
    secure: SecureAggregation | None = None

    @model_validator(mode="after")
    def _per_round_fits(self) -> FedAvg:
        if self.min_clients > self.clients:
            raise ValueError(
                f"min_clients {self.min_clients} asks for more clients a round than the "
                f"{self.clients} there are"
            )
        if self.secure is not None and self.aggregate.needs_each:
            raise ValueError(
                f"secure aggregation reveals only the sum; the {self.aggregate.kind} "
                "aggregate needs every update"
            )
        if self.privacy is not None and self.aggregate.needs_each:
            raise ValueError(
                f"privacy bounds the mean's sensitivity; it cannot be combined with the "
                f"{self.aggregate.kind} aggregate"
            )
        least = self.aggregate.least_clients()
        if self.per_round < least:
            raise ValueError(
                f"{self.aggregate.kind} needs at least {least} clients a round, "
                f"{self.per_round} are sampled; raise fraction or min_clients"
            )
        return self

    @property
    def per_round(self) -> int:
        """Clients sampled each round."""
        return min(self.clients, max(self.min_clients, round(self.fraction * self.clients)))

    def group_column(self) -> str | None:
        return self.partition.group_column()

    def check_data(self, train: Source, *, seed: int) -> None:
        if not train.partitioned:  # a Spark partition is split in its own worker
            labels = train.arrays()[1]
            self.partition.split(labels, clients=self.clients, seed=seed, groups=train.groups())
        if self.privacy is not None and self.privacy.max_epsilon is not None:
            from corral.federated.privacy import Accountant

            # not even one round within the budget is an error, not an empty history
            Accountant(self.privacy).ensure_budget(self.per_round / self.clients)

    def build(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss: LossFn,
        ctx: Context,
        plan: StrategyPlan,
    ) -> RoundReplica:
        assert optimizer is not None  # needs_optimizer: the clients' local optimizer
        return FederatedReplica(self, model, optimizer, loss, ctx)

    # -- what the variants change, called in the workers --------------------------------

    def penalise(self, params: Sequence[torch.Tensor], start_vec: torch.Tensor) -> None:
        """Change a client's gradients before its optimizer steps (FedProx's proximal
        term); FedAvg leaves them."""

    def server_step(
        self, state: dict[str, torch.Tensor], start_vec: torch.Tensor, aggregate: torch.Tensor
    ) -> torch.Tensor:
        """The next global weights from this round's and the aggregate update; `state`
        is the server optimizer's, kept across rounds and checkpoints (FedOpt's moments)."""
        return start_vec + self.server_lr * aggregate


def sample_clients(config: FedAvg, *, seed: int, round_: int) -> tuple[np.ndarray, np.ndarray]:
    """The clients round `round_` samples, and which of them report (the rest drop out).

    A pure function of the seed and the round, so every worker, and a restarted job,
    draws the same ones.
    """
    import numpy as np

    rng = np.random.default_rng([seed, round_])
    sampled = np.sort(rng.choice(config.clients, config.per_round, replace=False))
    reports = rng.random(len(sampled)) >= config.dropout
    return sampled, sampled[reports]


@dataclass(frozen=True)
class ClientRun:
    """One client's local training in a round, as the worker that simulates it runs it.

    Attributes:
        client: The client's index in the partition.
        start: The global weights it trains from (FedAvg: the round's).
        order_seed: Seeds the order of its samples (`LocalTraining.update`).
        scale: The factor on its sample-weighted update (FedBuff: its staleness weight);
            the mean still divides by the plain sample counts.
    """

    client: int
    start: torch.Tensor
    order_seed: tuple[int, ...]
    scale: float = 1.0


@dataclass(frozen=True)
class RoundClients:
    """Which clients a round asks, and which of them this worker trains.

    Attributes:
        sampled: Every client the round asks, on all workers.
        reporting: Those of `sampled` that report (the rest dropped out).
        played: This worker's share of `sampled`, dropped ones included (secure
            aggregation's masks are shared with them).
        runs: This worker's reporting clients, in the order it trains them.
    """

    sampled: np.ndarray
    reporting: np.ndarray
    played: np.ndarray
    runs: list[ClientRun]


class FederatedReplica(RoundReplica):
    """One simulation worker: trains its part of each round's clients, then aggregates."""

    def __init__(
        self,
        config: FedAvg,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossFn,
        ctx: Context,
    ) -> None:
        self.config, self.model, self.optimizer, self.loss, self.ctx = (
            config,
            model,
            optimizer,
            loss,
            ctx,
        )
        self.local = LocalTraining(config, model, optimizer, loss, rank=ctx.rank)
        self._data: tuple[torch.Tensor, torch.Tensor, list[np.ndarray]] | None = None
        self._partitioned = False  # each worker holds only its own rows (Spark)
        self._metrics: dict[str, Any] = {}
        #: the server optimizer's state (FedOpt's moments), checkpointed with the job
        self._server: dict[str, torch.Tensor] = {}
        self._secure_bytes = 0.0
        self._accountant = None
        if config.privacy is not None:
            from corral.federated.privacy import Accountant

            self._accountant = Accountant(config.privacy)

    # -- the round -----------------------------------------------------------------

    def train_round(
        self, epoch: int, data: Source, *, epochs: int, batch_size: int, seed: int
    ) -> RoundTotals:
        import torch

        start = time.monotonic()
        x, y, parts = self._clients(data, seed)
        rank, world = self.ctx.rank, self.ctx.world_size
        start_vec = self.local.flat().clone()
        chosen = self.round_clients(epoch, seed, start_vec)
        sampled, reporting, played = chosen.sampled, chosen.reporting, chosen.played
        totals = Totals()
        each: list[torch.Tensor] = []
        weights: list[float] = []
        weighted = torch.zeros_like(start_vec)
        secured: dict[int, np.ndarray] = {}
        compute, clipped = 0.0, 0
        last_report = start
        for done, run in enumerate(chosen.runs):
            client = run.client
            began = time.monotonic()
            update = self.local.update(
                x,
                y,
                parts[client],
                run.start,
                order_seed=run.order_seed,
                batch_size=batch_size,
                totals=totals,
            )
            compute += time.monotonic() - began
            samples = float(len(parts[client]))
            if self.config.privacy is not None:
                update, was_clipped = self._privatize(update, seed=seed, epoch=epoch, client=client)
                clipped += was_clipped
                samples = 1.0
            if self.config.secure is not None:
                secured[client] = update.cpu().numpy()
                weights.append(1.0)
            elif self.config.aggregate.needs_each:
                each.append(update)
                weights.append(samples)
            else:
                weighted.add_(update, alpha=samples * run.scale)
                weights.append(samples)
            now = time.monotonic()
            if rank == 0 and now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                self.ctx.report(
                    kind="progress",
                    epoch=epoch + 1,
                    epochs=epochs,
                    step=done + 1,
                    steps=len(chosen.runs),
                    loss=totals.loss_sum / max(totals.count, 1),
                    samples_per_s=totals.count * world / (now - start),
                )
        if self.config.secure is not None:
            aggregate, reported, compute_total, clipped_total = self._secure_aggregate(
                start_vec,
                secured,
                played,
                sampled,
                reporting,
                compute,
                clipped,
                seed=seed,
                epoch=epoch,
            )
        else:
            aggregate, reported, compute_total, clipped_total = self._aggregate(
                start_vec, weighted, each, weights, compute, clipped, seed=seed, epoch=epoch
            )
        self.local.set_flat(self.config.server_step(self._server, start_vec, aggregate))
        elapsed = time.monotonic() - start
        self._metrics = {
            "clients": float(len(sampled)),
            "clients_reported": reported,
            "clients_dropped": float(len(sampled) - len(reporting)),
            "updates_per_s": reported / elapsed if elapsed > 0 else math.inf,
            "client_compute_s": compute_total / max(reported, 1.0),
        }
        if self._accountant is not None:
            self._accountant.step(self._sample_rate)
            self._metrics["epsilon"] = self._accountant.epsilon()
            self._metrics["clipped_fraction"] = clipped_total / max(reported, 1.0)
            if self.finished():
                self._metrics["privacy_budget_spent"] = 1.0
        if self.config.secure is not None:
            self._metrics["secagg_bytes_per_client"] = self._secure_bytes
        return RoundTotals(
            loss_sum=totals.loss_sum,
            correct=totals.correct,
            count=totals.count,
            classification=totals.classification,
        )

    def round_clients(self, epoch: int, seed: int, start_vec: torch.Tensor) -> RoundClients:
        """Round `epoch`'s clients (`sample_clients`), this worker's every W-th, each
        trained from the round's global weights `start_vec`; called once a round."""
        import numpy as np

        sampled, reporting = sample_clients(self.config, seed=seed, round_=epoch)
        played = sampled[self.hosted(sampled)]
        runs = [
            ClientRun(int(c), start_vec, order_seed=(seed, epoch, int(c)))
            for c in np.intersect1d(played, reporting)
        ]
        return RoundClients(sampled, reporting, played, runs)

    def _aggregate(
        self,
        start_vec: torch.Tensor,
        weighted: torch.Tensor,
        each: list[torch.Tensor],
        weights: list[float],
        compute: float,
        clipped: int,
        *,
        seed: int,
        epoch: int,
    ) -> tuple[torch.Tensor, float, float, float]:
        """The round's aggregate update over every worker's clients; also how many
        reported, their summed compute time and how many of them were clipped."""
        import numpy as np
        import torch
        import torch.distributed as dist

        d = len(start_vec)
        if not self.config.aggregate.needs_each:
            # one all-reduce: [Σ nᵢ·Δᵢ, Σ nᵢ, clients, compute seconds, clipped]
            tail = torch.tensor(
                [sum(weights), len(weights), compute, clipped],
                dtype=weighted.dtype,
                device=weighted.device,
            )
            buf = torch.cat([weighted, tail])
            dist.all_reduce(buf)
            total, reported, compute_total, clipped_total = buf[d:].tolist()
            if self.config.privacy is None:
                return buf[:d] / max(total, 1e-30), reported, compute_total, clipped_total
            mean = self._private_mean(buf[:d].cpu().numpy(), seed=seed, epoch=epoch)
            return mean.to(start_vec.device), reported, compute_total, clipped_total
        # every update: pad to the most any worker holds, gather, drop the padding
        counts = torch.tensor([len(each), compute], dtype=torch.float64, device=start_vec.device)
        dist.all_reduce(counts)
        reported, compute_total = counts.tolist()
        rows = math.ceil(reported / self.ctx.world_size) if reported else 0
        mine = torch.zeros(max(rows, 1), d + 1, dtype=start_vec.dtype, device=start_vec.device)
        for i, (update, w) in enumerate(zip(each, weights, strict=True)):
            mine[i, :d], mine[i, d] = update, w
        gathered = [torch.empty_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, mine)
        table = torch.cat(gathered).cpu().numpy()
        table = table[table[:, d] > 0]
        if not len(table):
            return torch.zeros_like(start_vec), 0.0, compute_total, 0.0
        combined = self.config.aggregate.combine(table[:, :d], table[:, d])
        update = torch.from_numpy(np.ascontiguousarray(combined, dtype=table.dtype))
        update = update.to(start_vec.device)
        return update, reported, compute_total, 0.0

    # -- helpers -------------------------------------------------------------------------

    def hosted(self, clients: np.ndarray) -> np.ndarray:
        """Which of `clients` (a round's, in order) this worker trains, as a mask: every
        W-th when every worker holds all the data; on Spark, where each holds only its
        partition, the clients made of its rows (client c lives on worker c mod W)."""
        import numpy as np

        rank, world = self.ctx.rank, self.ctx.world_size
        if self._partitioned:
            return np.asarray(clients) % world == rank
        return np.arange(len(clients)) % world == rank

    def _clients(
        self, data: Source, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
        """The data as tensors and every client's sample indices, computed once. On a
        Spark partition only this worker's clients have rows: its part is split into
        them by the same rule, seeded per worker."""
        if self._data is None:
            import numpy as np
            import torch

            x, y = data.arrays()
            total = self.config.clients
            self._partitioned = data.partitioned
            if data.partitioned:
                rank, world = self.ctx.rank, self.ctx.world_size
                own = [c for c in range(total) if c % world == rank]
                split = self.config.partition.split(y, clients=len(own), seed=seed + 7919 * rank)
                parts = [np.empty(0, np.int64)] * total
                for c, rows in zip(own, split, strict=True):
                    parts[c] = rows
            else:
                parts = self.config.partition.split(
                    y, clients=total, seed=seed, groups=data.groups()
                )
            device = self.ctx.device
            self._data = (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), parts)
        return self._data

    def _secure_aggregate(
        self,
        start_vec: torch.Tensor,
        secured: dict[int, np.ndarray],
        played: np.ndarray,
        sampled: np.ndarray,
        reporting: np.ndarray,
        compute: float,
        clipped: int,
        *,
        seed: int,
        epoch: int,
    ) -> tuple[torch.Tensor, float, float, float]:
        """`_aggregate` through secure aggregation: the server side sees only the sum."""
        import torch
        import torch.distributed as dist

        from corral.strategies.secure_round import secure_sum

        assert self.config.secure is not None
        result = secure_sum(
            self.config.secure,
            secured,
            mine=[int(c) for c in played],
            sampled=[int(c) for c in sampled],
            dropped=set(sampled.tolist()) - set(reporting.tolist()),
            seed=seed,
            epoch=epoch,
        )
        counts = torch.tensor([compute, clipped], dtype=torch.float64)
        dist.all_reduce(counts)
        compute_total, clipped_total = counts.tolist()
        reported = float(len(result.included))
        self._secure_bytes = result.bytes_per_client
        if self.config.privacy is not None:
            mean = self._private_mean(result.total, seed=seed, epoch=epoch)
        else:
            mean = torch.from_numpy(result.total / max(reported, 1.0))
        return mean.to(start_vec.device), reported, compute_total, clipped_total

    def _private_mean(self, total: np.ndarray, *, seed: int, epoch: int) -> torch.Tensor:
        """DP-FedAvg's average of the round's clipped `total`: noised, over the expected
        clients; the same draw on every worker, as if one aggregator had added it."""
        import numpy as np
        import torch

        from corral.federated.privacy import noised_average

        assert self.config.privacy is not None
        rng = np.random.default_rng([seed, epoch, 2**31])
        mean = noised_average(total, self.config.per_round, self.config.privacy, rng)
        return torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32))

    def _privatize(
        self, update: torch.Tensor, *, seed: int, epoch: int, client: int
    ) -> tuple[torch.Tensor, bool]:
        """The update as a DP client sends it: clipped (and noised, in local mode)."""
        import numpy as np
        import torch

        from corral.federated.privacy import privatize_update

        assert self.config.privacy is not None
        rng = np.random.default_rng([seed, epoch, client, 1])
        sent, was_clipped = privatize_update(update.cpu().numpy(), self.config.privacy, rng)
        return torch.from_numpy(sent).to(update.device), was_clipped

    @property
    def _sample_rate(self) -> float:
        return self.config.per_round / self.config.clients

    def finished(self) -> bool:
        """A privacy budget ends training before the round that would overspend it."""
        return self._accountant is not None and self._accountant.would_exceed(self._sample_rate)

    def metrics(self) -> dict[str, Any]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"server": {k: v.cpu() for k, v in self._server.items()}}
        if self._accountant is not None:  # the budget spent so far outlives a restart
            state["privacy"] = self._accountant.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._server = {k: v.to(self.ctx.device) for k, v in state.get("server", {}).items()}
        if self._accountant is not None and "privacy" in state:
            self._accountant.load_state_dict(state["privacy"])
