"""The aggregator of a federated job whose clients are real processes: ``corral fl serve``.

Each round (an epoch of the job) the aggregator waits until the job's ``clients`` are
enrolled (or ``min_clients`` are and no more came for ``grace`` seconds), samples
``max(min_clients, fraction × enrolled)`` of them (seeded), sends each the global
weights and waits for their updates. The round closes when every sampled
client has reported, or at ``round_timeout`` with those that did: a client that dropped
mid-round is simply not in the sum; fewer than ``min_clients`` updates leave the model
unchanged (the row says ``round_failed``). The updates are combined by the strategy's
rule and server step, exactly as in simulation (`corral.strategies.fedavg`), with the
central-DP clipping, noise and accountant when ``privacy`` is set. The validation data,
if the job names any, is evaluated here after each round.

**Faults.** After every round the aggregator writes a checkpoint (model, server state,
privacy ledger, history) in its folder, beside the enrolment file that keeps its keys,
port and token. Started again with the same folder (the same command), it resumes at the
next round on the same address; clients, which ping while idle, are told ``who`` and
enrol again. An update carries its round, so one trained for a round before the restart
is dropped, never counted twice.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from corral.comm import frames
from corral.comm.curve import JobKeys
from corral.data import Source
from corral.errors import LaunchError, SpecError, TrainingError
from corral.federation.wire import ENROLMENT, JoinAddress
from corral.jobs import parts_for, source_for
from corral.runtime import checkpoint as ckpt
from corral.spec import Federation, JobSpec
from corral.strategies.fedavg import FedAvg
from corral.strategies.local_update import LocalTraining
from corral.train.loop import build_model

log = logging.getLogger("corral")

#: Seconds a client may stay silent (no ping, no update) before it counts as gone.
CLIENT_TIMEOUT_S = 10.0


@dataclass
class _Client:
    name: str
    samples: int
    seen: float
    round: int | None = None


#: One client's update and the header it came with (samples, loss sums, compute time).
_Update = tuple[np.ndarray, dict[str, Any]]


@dataclass
class _Round:
    """The updates one round has received so far."""

    index: int
    sampled: list[bytes]
    expect: str = "update"  # the kind of answer it collects
    updates: dict[bytes, _Update] = field(default_factory=dict)


def round_sums(reported: list[_Update]) -> dict[str, Any]:
    """The round's training loss (and accuracy) over the samples its clients reported."""
    count = sum(m["count"] for _, m in reported)
    row = {"loss": sum(m["loss_sum"] for _, m in reported) / max(count, 1)}
    if any(m["classification"] for _, m in reported):
        row["accuracy"] = sum(m["correct"] for _, m in reported) / max(count, 1)
    return row


class Aggregator:
    """Serves one federated job to real clients; see the module docstring.

    Args:
        spec: The job; its strategy must be a federated one.
        base: The job file's folder (paths in the spec are relative to it).
        folder: Checkpoints and the enrolment file; the same folder resumes the job.
        settings: Where to listen (port 0: a free one; a resumed job reuses its own),
            how long a round waits for updates and how long for ``min_clients`` to
            enrol; default: the spec's ``federation`` section, or its defaults.
        grace: Seconds a round waits for more clients once ``min_clients`` are
            enrolled, while fewer than the job's ``clients`` are.
    """

    def __init__(
        self,
        spec: JobSpec,
        *,
        base: Path,
        folder: Path,
        settings: Federation | None = None,
        grace: float = 5.0,
    ) -> None:
        if not isinstance(spec.strategy, FedAvg):
            raise SpecError(
                f"strategy: corral fl serve runs a federated strategy (fedavg, fedprox, "
                f"fedadam…), not {spec.strategy.kind}"
            )
        settings = settings or spec.federation or Federation()
        self.spec, self.config = spec, spec.strategy
        self.folder, self.round_timeout, self.wait = folder, settings.round_timeout, settings.wait
        self.grace = grace
        model_fn, self.loss, _ = parts_for(spec, base=base)
        torch.manual_seed(spec.seed)
        self.model = build_model(model_fn)
        self.local = LocalTraining(
            self.config, self.model, torch.optim.SGD([torch.zeros(1)]), self.loss
        )
        self.validation: Source | None = (
            source_for(spec.validation, base) if spec.validation else None
        )
        self.address = self._enrolment(settings.host, settings.port)
        self.history: list[dict[str, Any]] = []
        self.server_state: dict[str, torch.Tensor] = {}
        self.accountant = None
        if self.config.privacy is not None:
            from corral.federated.privacy import Accountant

            self.accountant = Accountant(self.config.privacy)
        self.start_round = self._restore()
        self.clients: dict[bytes, _Client] = {}
        #: when a client last joined or left: a round waits `grace` after it
        self._pool_changed = time.monotonic()

    # -- set-up --------------------------------------------------------------------

    def _enrolment(self, host: str, port: int) -> JoinAddress:
        """Bind the job's socket and return its address: keys, port and token made once
        (a free port where `port` is 0), then read back from the folder on a restart."""
        path = self.folder / ENROLMENT
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is not None:
            self.keys = JobKeys(*(saved[k].encode() for k in ("sp", "ss", "cp", "cs")))
            host, port, token = saved["host"], saved["port"], saved["token"]
        else:
            self.keys, token = JobKeys.generate(), secrets.token_urlsafe(24)
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # a CURVE server without a ZAP domain: clients bring keys of their own, and the
        # token in their hello admits them (`corral.federation.wire`)
        sock.curve_server = True
        sock.curve_secretkey = self.keys.server_secret
        sock.curve_publickey = self.keys.server_public
        try:
            if port == 0:
                port = sock.bind_to_random_port(f"tcp://{host}")
            else:
                sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            sock.close()
            self.context.term()
            raise LaunchError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.sock = sock
        if saved is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                k = self.keys
                secrets_ = {
                    "sp": k.server_public,
                    "ss": k.server_secret,
                    "cp": k.client_public,
                    "cs": k.client_secret,
                }
                json.dump(
                    {
                        "host": host,
                        "port": port,
                        "token": token,
                        **{name: v.decode() for name, v in secrets_.items()},
                    },
                    out,
                )
        return JoinAddress(host, port, self.keys.server_public, token)

    def _restore(self) -> int:
        found = ckpt.latest(self.folder)
        if found is None:
            return 0
        state = ckpt.load(found)
        self.model.load_state_dict(state["model"])
        self.server_state = dict(state["strategy"].get("server", {}))
        if self.accountant is not None and "privacy" in state["strategy"]:
            self.accountant.load_state_dict(state["strategy"]["privacy"])
        self.history = list(state["history"])
        log.info("resuming at round %d from %s", state["data_position"]["epoch"] + 1, found)
        return int(state["data_position"]["epoch"])

    # -- the rounds ----------------------------------------------------------------

    def run(self, on_round: Callable[[dict[str, Any]], None] = lambda row: None) -> list[dict]:
        """Serve every round left; returns the job's history (one row a round)."""
        sock = self.sock
        try:
            for index in range(self.start_round, self.spec.epochs):
                row = self._round(index)
                if row is None:
                    log.info("privacy budget spent: no round %d", index + 1)
                    break
                self.history.append(row)
                self._checkpoint(index + 1)
                on_round(row)
            for identity in self.clients:
                sock.send_multipart([identity, *frames.pack({"kind": "done"})])
            return self.history
        finally:
            sock.close(linger=200)
            self.context.term()

    def _round(self, index: int) -> dict[str, Any] | None:
        """Run round `index`; None if the privacy budget leaves no room for it."""
        start = time.monotonic()
        per_round, rate = self._ready()
        if self.accountant is not None and self.accountant.would_exceed(rate):
            return None
        row: dict[str, Any] = {"epoch": float(index + 1)}
        if self.config.secure is not None:
            sampled, reported, mean = self._secure(index, per_round, row)
        else:
            sampled, reported = self._gather(index, per_round)
            mean = None
            if len(reported) >= self.config.min_clients:
                samples = [m["samples"] for _, m in reported]
                mean = self._combine([u for u, _ in reported], samples, index, per_round)
        if mean is not None and len(reported) >= self.config.min_clients:
            if self.accountant is not None:
                self.accountant.step(rate)
            start_vec = self.local.flat()
            aggregate = torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32))
            self.local.set_flat(self.config.server_step(self.server_state, start_vec, aggregate))
        else:
            row["round_failed"] = 1.0
        row |= round_sums(reported)
        row.update(self._evaluate())
        return row | self._counts(sampled, reported, start)

    def _ready(self) -> tuple[int, float]:
        """Wait for the round's clients; how many it samples, and that as a rate."""
        self._forget_silent()  # e.g. a client that did not report last round
        self._await_clients(time.monotonic() + self.wait)
        per_round = min(
            len(self.clients),
            max(self.config.min_clients, round(self.config.fraction * len(self.clients))),
        )
        return per_round, per_round / len(self.clients)

    def _sample(self, index: int, per_round: int) -> list[bytes]:
        rng = np.random.default_rng([self.spec.seed, index])
        ids = sorted(self.clients)
        return [ids[i] for i in sorted(rng.choice(len(ids), per_round, replace=False))]

    def _gather(self, index: int, per_round: int) -> tuple[list[bytes], list[_Update]]:
        """Send round `index` to `per_round` clients (seeded) and collect their updates
        until all reported or `round_timeout`: those sampled, and what came."""
        sampled = self._sample(index, per_round)
        weights = self.local.flat().numpy()
        train = {c: ({"kind": "train"}, [weights]) for c in sampled}
        updates = self._exchange(index, train, "update")
        self._idle(sampled)
        return sampled, list(updates.values())

    def _secure(
        self, index: int, per_round: int, row: dict[str, Any]
    ) -> tuple[list[bytes], list[_Update], np.ndarray | None]:
        """Round `index` by secure aggregation (`corral.federation.secure`): those
        sampled, the survivors' headers, and the mean update (None if it failed)."""
        from corral.federation.secure import serve_round

        assert self.config.secure is not None
        sampled = self._sample(index, per_round)
        outcome = serve_round(
            self.config.secure,
            lambda messages, kind: self._exchange(index, messages, kind),
            sampled,
            self.local.flat().numpy(),
            seed=self.spec.seed,
            index=index,
        )
        self._idle(sampled)
        row["secagg_bytes_per_client"] = outcome.bytes_per_client
        if outcome.total is None:
            log.warning("round %d: secure aggregation failed: %s", index + 1, outcome.failure)
            return sampled, [], None
        if self.config.privacy is None:
            return sampled, outcome.reported, outcome.total / max(len(outcome.reported), 1)
        from corral.federated.privacy import noised_average

        rng = np.random.default_rng([self.spec.seed, index, 2**31])
        mean = noised_average(outcome.total, per_round, self.config.privacy, rng)
        return sampled, outcome.reported, mean

    def _exchange(
        self,
        index: int,
        messages: dict[bytes, tuple[dict[str, Any], list[np.ndarray]]],
        expect: str,
    ) -> dict[bytes, _Update]:
        """Send each client its message of round `index`; collect the answers of kind
        `expect` until every one came or `round_timeout` passed."""
        current = _Round(index, list(messages), expect=expect)
        for identity, (header, arrays) in messages.items():
            if identity in self.clients:
                self.clients[identity].round = index  # busy: silence is not absence
            message = frames.pack({**header, "round": index}, arrays)
            self.sock.send_multipart([identity, *message])
        deadline = time.monotonic() + self.round_timeout
        while len(current.updates) < len(messages) and time.monotonic() < deadline:
            self._serve(deadline, current)
        return current.updates

    def _idle(self, sampled: list[bytes]) -> None:
        """The round is over: those that never reported time out if silent."""
        for identity in sampled:
            if identity in self.clients:
                self.clients[identity].round = None

    def _counts(
        self, sampled: list[bytes], reported: list[_Update], start: float
    ) -> dict[str, float]:
        return {
            "clients": float(len(sampled)),
            "clients_reported": float(len(reported)),
            "clients_dropped": float(len(sampled) - len(reported)),
            "clients_enrolled": float(len(self.clients)),
            "client_compute_s": sum(m["compute_s"] for _, m in reported) / max(len(reported), 1),
            "time_s": time.monotonic() - start,
        } | ({"epsilon": self.accountant.epsilon()} if self.accountant is not None else {})

    def _combine(
        self, updates: list[np.ndarray], samples: list[int], index: int, expected: int
    ) -> np.ndarray:
        """The round's mean update by the strategy's rule (central DP: clipped, noised)."""
        config = self.config
        table = np.stack(updates).astype(np.float32)
        if config.privacy is not None:
            from corral.federated.privacy import clip, noised_average

            clipped = sum(clip(u, config.privacy.clip)[0] for u in table)
            rng = np.random.default_rng([self.spec.seed, index, 2**31])
            return noised_average(np.asarray(clipped), expected, config.privacy, rng)
        return config.aggregate.combine(table, np.asarray(samples, dtype=np.float64))

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        if self.validation is None:
            return {}
        self.model.eval()
        loss_sum, correct, count, classes = 0.0, 0, 0, False
        for x, y in self.validation.batches(
            rank=0, world_size=1, epoch=0, seed=0, batch_size=1024, shuffle=False
        ):
            out = self.model(x)
            loss_sum += float(self.loss(out, y)) * len(y)
            count += len(y)
            if not y.is_floating_point() and out.ndim == 2 and out.shape[1] > 1:
                classes = True
                correct += int((out.argmax(1) == y).sum())
        self.model.train()
        row = {"val_loss": loss_sum / max(count, 1)}
        if classes:
            row["val_accuracy"] = correct / max(count, 1)
        return row

    def _checkpoint(self, rounds: int) -> None:
        strategy: dict[str, Any] = {"server": self.server_state}
        if self.accountant is not None:
            strategy["privacy"] = self.accountant.state_dict()
        ckpt.save(
            self.folder,
            rounds,
            {
                "model": self.model.state_dict(),
                "optimizer": {},
                "strategy": strategy,
                "data_position": {"epoch": rounds, "seed": self.spec.seed},
                "history": self.history,
            },
            keep=3,
        )

    # -- messages ------------------------------------------------------------------

    def _await_clients(self, deadline: float) -> None:
        """Until all the job's `clients` are enrolled, or `min_clients` are and `grace`
        seconds have passed since a client last joined or left (a round does not start
        on the first two of many clients still starting up; one that died long ago
        does not hold every later round up by `grace`)."""
        while len(self.clients) < self.config.clients:
            enough = len(self.clients) >= self.config.min_clients
            if enough and time.monotonic() - self._pool_changed >= self.grace:
                return
            if not enough and time.monotonic() >= deadline:
                raise TrainingError(
                    f"only {len(self.clients)} of min_clients {self.config.min_clients} "
                    f"clients joined in {self.wait:.0f} s"
                )
            self._serve(deadline, None)

    def _serve(self, deadline: float, current: _Round | None) -> None:
        """Answer what arrives until `deadline` (or one message); forget silent clients."""
        timeout = max(0.0, min(deadline - time.monotonic(), 1.0))
        if self.sock.poll(int(timeout * 1000)):
            sender, *rest = self.sock.recv_multipart(copy=False)
            self._handle(sender.bytes, rest, current)
        self._forget_silent()

    def _forget_silent(self) -> None:
        """Drop idle clients silent for `CLIENT_TIMEOUT_S` (one training is silent)."""
        now = time.monotonic()
        for identity, client in list(self.clients.items()):
            if client.round is None and now - client.seen > CLIENT_TIMEOUT_S:
                log.info("client %s went silent: dropped from the pool", client.name)
                del self.clients[identity]
                self._pool_changed = now

    def _handle(self, identity: bytes, rest: list[Any], current: _Round | None) -> None:
        try:
            header, arrays = frames.unpack(rest)
        except ValueError:
            return
        kind = header.get("kind")
        if kind == "hello":
            self._hello(identity, header)
            return
        client = self.clients.get(identity)
        if client is None:  # a client of the aggregator before a restart, say
            self.sock.send_multipart([identity, *frames.pack({"kind": "who"})])
            return
        client.seen = time.monotonic()
        if arrays:
            self._take(identity, header, arrays, current)

    def _take(
        self, identity: bytes, header: dict[str, Any], arrays: list[Any], current: _Round | None
    ) -> None:
        """A client's answer: kept if it is what the current round waits for from it (one
        for a round before a restart, or a duplicate, is dropped)."""
        if (
            current is not None
            and header.get("kind") == current.expect
            and header.get("round") == current.index
            and identity in current.sampled
            and identity not in current.updates
        ):
            current.updates[identity] = (np.array(arrays[0]), header)

    def _hello(self, identity: bytes, header: dict[str, Any]) -> None:
        def refuse(why: str) -> None:
            self.sock.send_multipart([identity, *frames.pack({"kind": "refused", "why": why})])

        if not hmac.compare_digest(str(header.get("token", "")), self.address.token):
            refuse("wrong enrolment token for this job")
            return
        params = sum(p.numel() for p in self.local.params)
        if header.get("params") != params:
            refuse(f"its model has {header.get('params')} parameters, the job's {params}")
            return
        if not header.get("samples"):
            refuse("the client has no training samples")
            return
        name = str(header.get("name", identity.hex()[:8]))
        self.clients[identity] = _Client(name, int(header["samples"]), time.monotonic())
        self._pool_changed = time.monotonic()
        log.info("client %s joined with %d samples", name, header["samples"])
        s = self.spec
        welcome = {
            "kind": "welcome",
            "batch_size": s.batch_size,
            "seed": s.seed,
            "strategy": self.config.model_dump(mode="json"),
        }
        self.sock.send_multipart([identity, *frames.pack(welcome)])
