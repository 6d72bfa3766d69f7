"""FedBuff: buffered asynchronous aggregation; the server steps once K updates are in.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation" (AISTATS
2022), Algorithm 1. `concurrency` clients train at once, each from the global model as it
was when it started; a client that finishes sends its update to a buffer and a new
client starts at once; when the buffer holds `buffer` (K) updates the server moves the
model by their mean, each update weighed down by its staleness s (the server steps taken
since its client started): 1/√(1 + s) as in the paper, or another
`corral.ps.consistency.staleness_weight` rule. Slow clients no longer hold a round up, as
they do in FedAvg; their updates arrive later and count for less.

**Simulation**: asynchrony needs time, so clients' run times are drawn (`EventSimulation`,
a seeded discrete-event simulation, the same on every worker and after a restart); which
clients finish before the K-th update is in, and from which version each started, follow
from it. One round (an epoch of the job) is one server step. Each round's K finishing
clients are trained as FedAvg's are (`FederatedReplica`: client *i* on worker *i* mod W,
one all-reduce), each from the past global weights it started from: the replica keeps
those in-flight clients need, at most ``max_staleness + 1`` (or ``concurrency + 1``)
flat vectors, with the simulation's state, in its checkpoints.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from corral.ps.consistency import staleness_weight
from corral.strategies.fedavg import ClientRun, FedAvg, FederatedReplica, RoundClients

if TYPE_CHECKING:
    import numpy as np
    import torch

    from corral.data import Source
    from corral.runtime.context import Context
    from corral.strategies.base import LossFn, RoundReplica, RoundTotals, StrategyPlan

#: Salts the simulation's draws apart from the job's other seeded streams.
_DRAWS, _STRAGGLERS = 0xFEDB, 0xFEDC


class FedBuff(FedAvg):
    """Buffered asynchronous federated averaging over `clients` simulated clients.

    Example:
        >>> corral.FedBuff(clients=100, buffer=5, concurrency=20, local_epochs=2,
        ...                stragglers=0.1, partition=corral.federated.LabelShards(shards=2))

    The FedAvg fields keep their meaning, except that ``fraction`` and ``min_clients``
    only size the default `concurrency`, and ``dropout`` is the chance that a client run
    never reports (its slot is given to another client when it would have finished).

    Attributes:
        buffer: K, the updates the server waits for before it steps (the paper's default
            is 10, with a concurrency of 10 to 100 times that).
        concurrency: The clients training at once; by default FedAvg's clients a round
            (``fraction × clients``). At least `buffer`: more means more staleness and
            less waiting for slow clients.
        staleness: How an update of staleness s counts: ``"sqrt"`` 1/√(1 + s), the
            paper's; ``"inverse"`` 1/(1 + s); ``"none"`` 1. The weights are not
            renormalised: a stale buffer moves the model less.
        max_staleness: Updates staler than this are dropped (and counted); None keeps
            every one. Also bounds the past weights kept to ``max_staleness + 1``.
        durations: How long a client run takes, in units of a typical run: ``"lognormal"``
            (mean 1, its log's standard deviation `spread`: device timings are skewed),
            ``"exponential"`` (mean 1, memoryless) or ``"constant"`` (1: with
            ``concurrency == buffer`` every client of a step started from the same
            model, as in synchronous FedAvg).
        spread: σ of a lognormal run time's log.
        stragglers: The fraction of clients, drawn once from the seed, that are slow in
            every run (slow devices stay slow).
        slowdown: How many times longer a straggler's runs take.

    Each round's history row has FedAvg's ``clients`` (the runs that ended while the
    buffer filled), ``clients_reported`` (K), ``clients_dropped`` (dropouts),
    ``updates_per_s`` and ``client_compute_s``, and ``staleness_mean``,
    ``staleness_max`` (of the buffered updates), ``dropped_stale`` and ``sim_time`` (the
    simulated clock at the step, in typical run times: compare it across settings).
    """

    kind: Literal["fedbuff"] = "fedbuff"  # type: ignore[assignment]
    buffer: int = Field(ge=1)
    concurrency: int | None = Field(default=None, ge=1)
    staleness: Literal["sqrt", "inverse", "none"] = "sqrt"
    max_staleness: int | None = Field(default=None, ge=0)
    durations: Literal["lognormal", "exponential", "constant"] = "lognormal"
    spread: float = Field(default=0.5, gt=0)
    stragglers: float = Field(default=0.0, ge=0, lt=1)
    slowdown: float = Field(default=10.0, ge=1)

    @model_validator(mode="after")
    def _buffer_fits(self) -> FedBuff:
        if self.concurrency is not None and self.concurrency > self.clients:
            raise ValueError(
                f"concurrency {self.concurrency} asks for more clients in flight than the "
                f"{self.clients} there are"
            )
        if self.buffer > self.in_flight:
            where = "concurrency" if self.concurrency is not None else "fraction × clients"
            raise ValueError(
                f"buffer {self.buffer} is more than the {self.in_flight} clients in flight "
                f"({where}): the server would never step"
            )
        if self.privacy is not None:
            raise ValueError(
                "privacy: DP accounting assumes rounds of sampled clients, not FedBuff's "
                "buffer; remove privacy or use fedavg"
            )
        if self.secure is not None:
            raise ValueError(
                "secure: secure aggregation of FedBuff's buffer is not built yet; remove "
                "secure or use fedavg"
            )
        if self.aggregate.needs_each:
            raise ValueError(
                f"FedBuff sums its buffer's staleness-weighted updates; the "
                f"{self.aggregate.kind} aggregate needs every update"
            )
        return self

    @property
    def in_flight(self) -> int:
        """Clients training at once."""
        return self.concurrency if self.concurrency is not None else self.per_round

    def build(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss: LossFn,
        ctx: Context,
        plan: StrategyPlan,
    ) -> RoundReplica:
        assert optimizer is not None  # needs_optimizer: the clients' local optimizer
        return BufferedReplica(self, model, optimizer, loss, ctx)


@dataclass(frozen=True)
class Arrival:
    """A client run that ended while the server filled one buffer.

    Attributes:
        client: The client.
        run: The run's number (runs are numbered as they start; a client may run twice).
        version: The global model version it started from.
        staleness: Server steps since then, when it arrived.
        finish: The simulated time it arrived.
        reported: False if it dropped out (``dropout``).
        too_stale: Whether it was dropped for passing ``max_staleness``.
    """

    client: int
    run: int
    version: int
    staleness: int
    finish: float
    reported: bool
    too_stale: bool

    @property
    def buffered(self) -> bool:
        """Whether its update went into the buffer."""
        return self.reported and not self.too_stale


class EventSimulation:
    """The clients in flight and the server's version, in simulated time; pure, seeded.

    Every client run draws its duration, whether it reports and its client from its own
    seeded stream (seed, run number), so the whole schedule is a function of the config
    and the seed. Runs end in order of their finish time, ties in order of start. When
    a run ends its slot is refilled, uniformly from the clients not in flight, once
    every run ending at that instant has been taken in and the server has stepped if
    they filled the buffer: the server is taken to step in no time, so a client that
    starts at the instant of a step gets the new model.
    """

    def __init__(self, config: FedBuff, *, seed: int) -> None:
        import numpy as np

        self.config, self.seed = config, seed
        self.now, self.version, self.started = 0.0, 0, 0
        #: slots freed at `now`, refilled when that instant is over
        self.idle = config.in_flight
        #: (finish, run, client, version started from, reports) of every run in flight
        self.flights: list[tuple[float, int, int, int, bool]] = []
        slow = round(config.stragglers * config.clients)
        order = np.random.default_rng([seed, _STRAGGLERS]).permutation(config.clients)
        self.stragglers = frozenset(int(c) for c in order[:slow])

    def next_step(self) -> list[Arrival]:
        """The runs that end until the buffer is full, in order; the server then steps."""
        arrivals: list[Arrival] = []
        buffered = 0
        while buffered < self.config.buffer:
            if self.idle and (not self.flights or self.flights[0][0] > self.now):
                self._refill()
            finish, run, client, version, reports = heapq.heappop(self.flights)
            self.now = finish
            self.idle += 1
            stale = self.version - version
            limit = self.config.max_staleness
            too_stale = reports and limit is not None and stale > limit
            arrival = Arrival(client, run, version, stale, finish, reports, too_stale)
            arrivals.append(arrival)
            buffered += arrival.buffered
        self.version += 1
        return arrivals

    def oldest_needed(self) -> int:
        """The oldest version a run in flight may still need to train from."""
        limit = self.config.max_staleness
        # the next step is self.version: an older start than that by more than the limit
        # is dropped on arrival, so its weights are not needed
        versions = [
            v for _, _, _, v, _ in self.flights if limit is None or self.version - v <= limit
        ]
        return min(versions, default=self.version)

    def _refill(self) -> None:
        import numpy as np

        busy = {f[2] for f in self.flights}
        for _ in range(self.idle):
            run = self.started
            self.started += 1
            rng = np.random.default_rng([self.seed, run, _DRAWS])
            reports = bool(rng.random() >= self.config.dropout)
            client = int(rng.integers(self.config.clients))
            while client in busy:  # uniform over those not in flight
                client = int(rng.integers(self.config.clients))
            busy.add(client)
            finish = self.now + self._duration(rng, client)
            heapq.heappush(self.flights, (finish, run, client, self.version, reports))
        self.idle = 0

    def _duration(self, rng: np.random.Generator, client: int) -> float:
        c = self.config
        if c.durations == "lognormal":  # mean 1: exp(μ + σ²/2) = 1
            base = float(rng.lognormal(-(c.spread**2) / 2, c.spread))
        elif c.durations == "exponential":
            base = float(rng.exponential(1.0))
        else:
            base = 1.0
        return base * (c.slowdown if client in self.stragglers else 1.0)

    def state_dict(self) -> dict[str, Any]:
        """Plain data (numbers and lists) for a checkpoint."""
        return {
            "now": self.now,
            "version": self.version,
            "started": self.started,
            "idle": self.idle,
            "flights": [list(f) for f in self.flights],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.now, self.version = float(state["now"]), int(state["version"])
        self.started, self.idle = int(state["started"]), int(state["idle"])
        self.flights = [
            (float(f), int(r), int(c), int(v), bool(ok)) for f, r, c, v, ok in state["flights"]
        ]
        heapq.heapify(self.flights)


class BufferedReplica(FederatedReplica):
    """One simulation worker of FedBuff: FedAvg's round, with the clients the event
    simulation says finish, each trained from the version it started from."""

    config: FedBuff

    def __init__(
        self,
        config: FedBuff,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossFn,
        ctx: Context,
    ) -> None:
        super().__init__(config, model, optimizer, loss, ctx)
        self._simulation: EventSimulation | None = None
        self._restored: dict[str, Any] | None = None
        #: global weights by version, those that in-flight clients started from
        self._past: dict[int, torch.Tensor] = {}
        self._arrivals: list[Arrival] = []

    def round_clients(self, epoch: int, seed: int, start_vec: torch.Tensor) -> RoundClients:
        import numpy as np

        simulation = self._simulate(seed)
        self._past[simulation.version] = start_vec  # the model runs starting now get
        self._arrivals = simulation.next_step()
        buffered = [a for a in self._arrivals if a.buffered]
        mine = self.hosted(np.array([a.client for a in buffered], dtype=np.int64))
        runs = [
            ClientRun(
                a.client,
                self._past[a.version],
                order_seed=(seed, epoch, a.client, a.run),
                scale=staleness_weight(a.staleness, self.config.staleness),
            )
            for a, own in zip(buffered, mine, strict=True)
            if own
        ]
        finished = np.array([a.client for a in self._arrivals], dtype=np.int64)
        reporting = np.array([a.client for a in self._arrivals if a.reported])
        played = finished[self.hosted(finished)]
        return RoundClients(finished, reporting, played, runs)

    def train_round(
        self, epoch: int, data: Source, *, epochs: int, batch_size: int, seed: int
    ) -> RoundTotals:
        totals = super().train_round(epoch, data, epochs=epochs, batch_size=batch_size, seed=seed)
        simulation = self._simulate(seed)
        oldest = simulation.oldest_needed()
        self._past = {v: w for v, w in self._past.items() if v >= oldest}
        stale = [a.staleness for a in self._arrivals if a.buffered]
        self._metrics.update(
            staleness_mean=statistics.fmean(stale),
            staleness_max=float(max(stale)),
            dropped_stale=float(sum(a.too_stale for a in self._arrivals)),
            sim_time=simulation.now,
        )
        return totals

    def _simulate(self, seed: int) -> EventSimulation:
        """The event simulation, built on the first round (the job's seed comes with it)."""
        if self._simulation is None:
            self._simulation = EventSimulation(self.config, seed=seed)
            if self._restored is not None:
                self._simulation.load_state_dict(self._restored)
        return self._simulation

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._simulation is not None:
            state["simulation"] = self._simulation.state_dict()
        elif self._restored is not None:  # restored, then saved before any round
            state["simulation"] = self._restored
        state["past"] = {v: w.cpu() for v, w in self._past.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._restored = state.get("simulation")
        self._simulation = None
        self._past = {int(v): w.to(self.ctx.device) for v, w in state.get("past", {}).items()}
