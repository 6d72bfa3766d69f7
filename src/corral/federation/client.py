"""A real client of a federated job: ``corral fl join URL --job job.yaml --data …``.

The client builds the job's model, loss and optimizer from the same job file as the
aggregator (its code lives with the client), reads its own data (which never leaves it),
enrols with the job's token and then trains whatever round it is sent: the global
weights in, `LocalTraining` (the simulation's own client loop) for the strategy's local
epochs, the update out. While idle it pings, so an aggregator that restarted learns it is
there (it answers ``who``, and the client enrols again).
"""

from __future__ import annotations

import logging
import os
import socket as socketlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from corral.comm import frames
from corral.data import Source
from corral.errors import CorralError, TrainingError
from corral.federation.secure import SecureClient
from corral.federation.wire import JoinAddress
from corral.jobs import parts_for
from corral.spec import JobSpec
from corral.strategies import AnyStrategy
from corral.strategies.fedavg import FedAvg
from corral.strategies.local_update import LocalTraining, Totals
from corral.train.loop import build_model

log = logging.getLogger("corral")

#: Seconds between two pings of an idle client.
PING_S = 2.0


class Refused(CorralError):
    """The aggregator did not admit this client (wrong token, another model…)."""


@dataclass(frozen=True)
class Joined:
    """What a client did: the rounds it trained for, and whether the job ended."""

    rounds: int
    finished: bool


def join(
    address: JoinAddress,
    spec: JobSpec,
    data: Source,
    *,
    base: Path,
    name: str | None = None,
    timeout: float = 600.0,
) -> Joined:
    """Enrol at `address` and train the rounds sent until the job is done.

    Raises:
        Refused: The aggregator refused this client; its reason is the message.
        TrainingError: Nothing came from the aggregator for `timeout` seconds.
    """
    model_fn, loss, optimizer_fn = parts_for(spec, base=base)
    torch.manual_seed(spec.seed)
    model = build_model(model_fn)
    x_np, y_np = data.arrays()
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    name = name or f"{socketlib.gethostname()}-{os.getpid()}"
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hello = {
        "kind": "hello",
        "token": address.token,
        "name": name,
        "samples": len(y),
        "params": params,
    }
    context, sock = connect(address)
    local: LocalTraining | None = None
    settings: dict[str, Any] = {}
    rounds, last_heard = 0, time.monotonic()
    secure = SecureClient()
    try:
        sock.send_multipart(frames.pack(hello))
        while True:
            if not sock.poll(int(PING_S * 1000)):
                if time.monotonic() - last_heard > timeout:
                    raise TrainingError(
                        f"the aggregator at {address.endpoint} has not answered for "
                        f"{timeout:.0f} s; is corral fl serve running?"
                    )
                sock.send_multipart(frames.pack({"kind": "ping"}))
                continue
            last_heard = time.monotonic()
            header, arrays = frames.unpack(sock.recv_multipart())
            kind = header.get("kind")
            if kind == "refused":
                raise Refused(f"refused by the aggregator: {header.get('why')}")
            if kind == "who":
                sock.send_multipart(frames.pack(hello))
            elif kind == "welcome":
                config = _strategy(header["strategy"])
                optimizer = optimizer_fn(model.parameters())
                local = LocalTraining(config, model, optimizer, loss)
                settings = header
                log.info("joined %s as %s with %d samples", address.endpoint, name, len(y))
            elif kind == "secagg_keys":
                sock.send_multipart(secure.keys(header))
            elif kind == "secagg_roster" and secure.active:
                sock.send_multipart(secure.shares(arrays[0]))
            elif kind == "secagg_unmask" and secure.active:
                sock.send_multipart(secure.unmask(arrays[0]))
            elif kind == "train" and local is not None:
                rounds += 1
                update, report = _train(local, x, y, arrays[0], header["round"], settings)
                if len(arrays) > 1 and secure.active:  # a secure round: only masked
                    update = secure.mask(update, arrays[1])
                sock.send_multipart(frames.pack(report, [update]))
            elif kind == "done":
                return Joined(rounds, True)
    finally:
        sock.close()
        context.term()


def connect(address: JoinAddress) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]]:
    """A CURVE-encrypted DEALER socket to the aggregator at `address`, with keys of its
    own; it keeps one identity across reconnects, so the aggregator knows it again."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.routing_id = os.urandom(8)
    sock.curve_serverkey = address.server_key
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(address.endpoint)
    return context, sock


def _strategy(raw: dict[str, Any]) -> FedAvg:
    """The job's federated strategy as the aggregator sent it."""
    from pydantic import TypeAdapter

    config = TypeAdapter(AnyStrategy).validate_python(raw)
    if not isinstance(config, FedAvg):
        raise Refused(f"the aggregator runs strategy {config.kind}, not a federated one")
    return config


def _train(
    local: LocalTraining,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: np.ndarray,
    round_: int,
    settings: dict[str, Any],
) -> tuple[np.ndarray, dict[str, Any]]:
    """One round's local training: the update and the ``update`` header reporting it."""
    began = time.monotonic()
    totals = Totals()
    start = torch.from_numpy(np.array(weights, dtype=np.float32))
    update = local.update(
        x,
        y,
        np.arange(len(y)),
        start,
        order_seed=(int(settings["seed"]), round_, os.getpid()),
        batch_size=int(settings["batch_size"]),
        totals=totals,
    )
    vector = update.numpy()
    privacy = local.config.privacy
    # noised before it leaves (local DP); in a secure round the aggregator cannot clip
    # one update, so the client clips its own
    if privacy is not None and (privacy.mode == "local" or local.config.secure is not None):
        from corral.federated.privacy import privatize_update

        vector, _ = privatize_update(vector, privacy, np.random.default_rng())
    header = {
        "kind": "update",
        "round": round_,
        "samples": len(y),
        "loss_sum": totals.loss_sum,
        "correct": totals.correct,
        "count": totals.count,
        "classification": totals.classification,
        "compute_s": time.monotonic() - began,
    }
    return np.ascontiguousarray(vector, dtype=np.float32), header
