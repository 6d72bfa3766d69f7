"""The parameter-server process: one shard, its optimizer, and a ZeroMQ ROUTER loop.

Each server owns one contiguous range of the flattened model (see `corral.ps.layout`) and
the optimizer state for it, so optimizer memory is split over servers too. Requests
arrive on one CURVE-authenticated ROUTER socket; a request that the consistency model says
must wait (a sync round not complete, an SSP worker too far ahead) is parked and answered
as soon as it may be. The loop is single-threaded: no locks, and the order of updates is
the order of arrival.

Protocol (JSON header + raw float32 buffers, see `corral.comm.frames`):

``ping``  → {}                  is the server there, and does it accept our key?
``init``  [values, tables…] → same   the first worker's values win; all get them back
``step``  [gradient, rows…] → [values] push one gradient (dense slice, touched table rows),
                                get fresh dense values when allowed
``pull``  → [values, tables…]   current values, never waits (epoch end, a joining worker)
``rows``  [rows per table] → [values per table]   the rows a batch is about to use
``leave`` → {}                  this worker is done; stop waiting for it
``stats`` → {histogram, …}      staleness histogram, updates, bytes moved

Server 0 also hosts the job's membership, so workers need no process group of their own
(one that a dead peer would break):

``epoch`` {epoch, steps, samples} → {}      a worker starts its share of an epoch
``meet``  {epoch} [sums] → {members} [sums]  epoch-end sum over the epoch's workers; waits
                                             for all of them, and names who trains next
``join``  → {epoch, members} | {finished}    a new worker; answered at the next ``meet``
``lost``  {worker, successor} → {epoch, …}   the driver reports a dead worker (every
                                             server); server 0 says what it left undone
                                             and holds the next meeting until the
                                             successor, if any, has come to join
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import zmq

from corral.comm.curve import JobKeys, secure_server, start_authenticator
from corral.comm.frames import pack, unpack
from corral.engines.base import serving_host
from corral.errors import CorralError
from corral.ps.client import INCARNATION_KEY
from corral.ps.consistency import Consistency, Mode, Update
from corral.ps.gradient import Gradient
from corral.train import checkpoint as ckpt
from corral.train.context import context

#: The store key under which server `i` publishes its address.
ADDRESS_KEY = "corral/ps/server/{}"


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """What every server of a job is told; built by the `ParameterServer` strategy."""

    mode: Mode
    workers: int
    staleness: int
    quorum: int
    lr_scaling: Literal["staleness"] | None
    optimizer: Literal["sgd", "adam"]
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    #: Save the shard every this many updates, so a killed server restarts from there.
    checkpoint_every: int | None = None


class Shard:
    """One server's parameters, optimizer and consistency book-keeping."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.rules = Consistency(
            mode=config.mode,
            workers=config.workers,
            staleness=config.staleness,
            quorum=config.quorum,
            lr_scaling=config.lr_scaling,
            average=Gradient.mean,
        )
        self.values: torch.Tensor | None = None
        self.tables: list[torch.nn.Parameter] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.base_lr = 0.0
        self.updates = 0

    def init(self, values: np.ndarray, tables: Sequence[np.ndarray] = ()) -> None:
        """Take the first worker's values; later offers are ignored."""
        if self.values is not None:
            return
        self.values = torch.nn.Parameter(torch.from_numpy(values.copy()))
        self.tables = [torch.nn.Parameter(torch.from_numpy(t.copy())) for t in tables]
        args = self.config.optimizer_args
        if self.config.optimizer == "sgd":
            self.optimizers = [torch.optim.SGD([self.values], **args)]
            if self.tables:  # torch's SGD takes sparse gradients, but not weight decay
                sparse = {k: v for k, v in args.items() if k in ("lr", "momentum", "dampening")}
                self.optimizers.append(torch.optim.SGD(self.tables, **sparse))
        else:
            self.optimizers = [torch.optim.Adam([self.values], **args)]
            if self.tables:  # lazy Adam: moments of untouched rows stay as they are
                sparse = {k: v for k, v in args.items() if k in ("lr", "betas", "eps")}
                self.optimizers.append(torch.optim.SparseAdam(self.tables, **sparse))
        self.base_lr = self.optimizers[0].param_groups[0]["lr"]

    def apply(self, updates: list[Update]) -> None:
        assert self.values is not None
        for update in updates:
            gradient: Gradient = update.gradient
            self.values.grad = torch.from_numpy(np.asarray(gradient.dense, dtype=np.float32))
            for table, (rows, values) in zip(self.tables, gradient.rows, strict=True):
                table.grad = torch.sparse_coo_tensor(
                    torch.from_numpy(np.asarray(rows, dtype=np.int64))[None],
                    torch.from_numpy(np.asarray(values, dtype=np.float32)),
                    tuple(table.shape),
                    check_invariants=False,  # `_Server.mismatch` checked the row numbers
                ).coalesce()
            for optimizer in self.optimizers:
                optimizer.param_groups[0]["lr"] = self.base_lr * update.lr_scale
                optimizer.step()
            self.updates += 1

    def state(self) -> dict[str, Any]:
        """Everything a restarted server needs (pending softsync gradients are not kept)."""
        assert self.values is not None
        rules = self.rules
        return {
            "values": self.values.detach().clone(),
            "tables": [t.detach().clone() for t in self.tables],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "updates": self.updates,
            "version": rules.version,
            "clocks": dict(rules.clocks),
            "live": sorted(rules.live),
            "histogram": dict(rules.histogram),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.init(state["values"].numpy(), [t.numpy() for t in state["tables"]])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.updates = state["updates"]
        rules = self.rules
        rules.version, rules.clocks = state["version"], dict(state["clocks"])
        rules.live, rules.histogram = set(state["live"]), Counter(state["histogram"])

    def snapshot(self, tables: bool = False) -> list[np.ndarray]:
        """Copies (replies are sent without copying while later updates change the shard):
        the dense slice, and with `tables` every table's rows too."""
        assert self.values is not None
        parts = [self.values, *self.tables] if tables else [self.values]
        return [p.detach().numpy().copy() for p in parts]

    def rows(self, wanted: list[np.ndarray]) -> list[np.ndarray]:
        """Copies of the requested rows of each table (row numbers local to this shard)."""
        return [t.detach().numpy()[r] for t, r in zip(self.tables, wanted, strict=True)]


@dataclass
class _Meeting:
    """One epoch-end sum in progress: the running total, who added to it, who waits."""

    total: np.ndarray
    came: set[int] = field(default_factory=set)
    waiting: list[bytes] = field(default_factory=list)


class _Server:
    def __init__(
        self, sock: zmq.Socket[bytes], shard: Shard, checkpoints: Path | None = None
    ) -> None:
        self.sock, self.shard, self.checkpoints = sock, shard, checkpoints
        self.saved_at = shard.updates
        # after a restart: the version restored, the updates since found lost, and the
        # workers whose first request (carrying the version they last saw) was counted
        self.restored_version: int | None = None
        self.lost_updates = 0
        self.counted: set[int] = set()
        self.last_push: dict[int, int] = {}  # worker → sequence number of its last push
        self.parked: list[tuple[bytes, int, int]] = []  # (identity, worker, clock)
        self.bytes_moved = 0
        self.started = time.monotonic()
        self.meetings: dict[int, _Meeting] = {}
        self.joiners: list[tuple[bytes, int]] = []
        self.expected: set[int] = set()  # successors started but not yet come to join
        self.progress: dict[int, dict[str, int]] = {}
        self.left_any = False  # once all live workers left, the job is over

    def send(self, ident: bytes, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
        frames = pack(header, arrays)
        self.bytes_moved += sum(len(f) for f in frames[1:])
        self.sock.send_multipart([ident, *frames], copy=False)

    def send_values(self, ident: bytes, tables: bool = False) -> None:
        """The dense slice (a step's reply; tables are pulled by rows before use), or with
        `tables` everything (init, pull)."""
        self.send(ident, {"version": self.shard.rules.version}, self.shard.snapshot(tables))

    def release_parked(self) -> None:
        still = []
        for ident, worker, clock in self.parked:
            if self.shard.rules.may_reply(worker, clock):
                self.send_values(ident)
            else:
                still.append((ident, worker, clock))
        self.parked = still

    def release_meetings(self) -> None:
        """Answer every meeting all live workers came to; joiners become members there."""
        rules = self.shard.rules
        for epoch in sorted(self.meetings):
            meeting = self.meetings[epoch]
            joining = {worker for _, worker in self.joiners}
            if not (rules.live <= meeting.came and self.expected <= joining):
                continue
            del self.meetings[epoch]
            for _, worker in self.joiners:
                rules.join(worker)
                self.expected.discard(worker)
            members = sorted(rules.live)
            for ident in meeting.waiting:
                self.send(ident, {"members": members}, [meeting.total])
            for ident, _ in self.joiners:
                self.send(ident, {"epoch": epoch + 1, "members": members})
            self.joiners = []

    def release_joiners_if_over(self) -> None:
        if self.left_any and not self.shard.rules.live:
            for ident, _ in self.joiners:
                self.send(ident, {"finished": True})
            self.joiners = []

    def drop(self, worker: int) -> dict[str, int]:
        """Forget `worker` (finished or dead); returns what it had done of its last epoch."""
        rules, started = self.shard.rules, self.progress.pop(worker, None)
        done = {}
        if started is not None and worker in rules.clocks:
            done = {**started, "steps_done": rules.clocks[worker] - started["clock"]}
        self.shard.apply(rules.leave(worker))
        self.expected.discard(worker)
        self.parked = [p for p in self.parked if p[1] != worker]
        self.left_any = True
        self.release_parked()
        self.release_meetings()
        self.release_joiners_if_over()
        return done

    def checkpoint(self) -> None:
        """Save the shard if `checkpoint_every` updates were applied since the last save."""
        every = self.shard.config.checkpoint_every
        if self.checkpoints is None or every is None:
            return
        if self.shard.updates - self.saved_at >= every:
            ckpt.save(self.checkpoints, self.shard.updates, self.shard.state(), keep=2)
            self.saved_at = self.shard.updates

    def restore(self) -> None:
        """Load the newest shard checkpoint: this server was restarted in place."""
        path = ckpt.latest(self.checkpoints) if self.checkpoints else None
        if path is None:
            raise CorralError(
                "this parameter server was restarted but has no shard checkpoint yet; "
                "it died before its first `checkpoint_every` updates"
            )
        self.shard.restore(ckpt.load(path))
        self.saved_at = self.shard.updates
        self.restored_version = self.shard.rules.version
        print(
            f"restored from {path.name}: update {self.shard.updates}, "
            f"version {self.restored_version}",
            flush=True,
        )

    def count_lost(self, worker: int, seen_version: int) -> None:
        """After a restart, a worker's first push says how far the lost shard had got."""
        if self.restored_version is None or worker in self.counted:
            return
        self.counted.add(worker)
        self.lost_updates = max(self.lost_updates, seen_version - self.restored_version)

    def mismatch(self, grad: Gradient) -> str:
        """What is wrong with a pushed gradient's shape, or "" if it fits this shard."""
        values, tables = self.shard.values, self.shard.tables
        if values is None:
            return f"gradient of {grad.dense.size} elements for a shard of no values yet"
        if grad.dense.size != values.numel():
            return f"gradient of {grad.dense.size} elements for a shard of {values.numel()}"
        if len(grad.rows) != len(tables):
            return f"rows for {len(grad.rows)} sparse tables, but the model has {len(tables)}"
        for t, ((rows, values_), table) in enumerate(zip(grad.rows, tables, strict=True)):
            if values_.shape != (len(rows), table.shape[1]) or (
                len(rows) and not 0 <= rows.min() <= rows.max() < table.shape[0]
            ):
                return (
                    f"rows {values_.shape} for table {t}, whose slice here is {tuple(table.shape)}"
                )
        return ""

    def handle(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        op, shard, rules = header["op"], self.shard, self.shard.rules
        self.bytes_moved += sum(a.nbytes for a in arrays)
        if op == "init":
            shard.init(arrays[0], arrays[1:])
            self.send_values(ident, tables=True)
        elif op == "step":
            grad = Gradient.from_arrays(arrays)
            problem = self.mismatch(grad)
            if problem:
                self.send(ident, {"error": f"{problem}: did the model's parameters change shape?"})
                return
            worker = header["worker"]
            if header["seq"] > self.last_push.get(worker, -1):  # else: a resent copy
                self.last_push[worker] = header["seq"]
                self.count_lost(worker, header["version"])
                shard.apply(rules.push(worker, grad, header["version"]))
                self.checkpoint()
            self.parked.append((ident, worker, rules.clocks[worker]))
            self.release_parked()
        elif op == "ping":
            self.send(ident, {})
        elif op == "pull":
            self.send_values(ident, tables=True)
        elif op == "rows":
            self.send(ident, {}, shard.rows(arrays))
        elif op == "leave":
            self.drop(header["worker"])
            self.send(ident, {})
        elif op == "lost":
            if header["successor"] is not None:
                self.expected.add(header["successor"])
            self.send(ident, self.drop(header["worker"]))
        elif op == "epoch":
            self.progress[header["worker"]] = {
                "epoch": header["epoch"],
                "steps": header["steps"],
                "samples": header["samples"],
                "clock": rules.clocks.get(header["worker"], 0),
            }
            self.send(ident, {})
        elif op == "meet":
            meeting = self.meetings.setdefault(header["epoch"], _Meeting(np.zeros_like(arrays[0])))
            if header["worker"] not in meeting.came:  # else: a resent copy
                meeting.total += arrays[0]
                meeting.came.add(header["worker"])
            meeting.waiting.append(ident)
            self.release_meetings()
        elif op == "join":
            self.joiners.append((ident, header["worker"]))
            self.release_meetings()  # one may have waited for this successor
            self.release_joiners_if_over()
        elif op == "stats":
            self.send(
                ident,
                {
                    "histogram": {str(k): v for k, v in sorted(rules.histogram.items())},
                    "updates": shard.updates,
                    "bytes": self.bytes_moved,
                    "seconds": time.monotonic() - self.started,
                    "lost_updates": self.lost_updates,
                },
            )
        else:
            self.send(ident, {"error": f"unknown operation '{op}'"})


def _bind(sock: zmq.Socket[bytes], host: str, store: dist.Store, rank: int) -> str:
    """Bind a fresh port, or after a restart the old one, which clients reconnect to."""
    key = ADDRESS_KEY.format(rank)
    if os.environ.get("CORRAL_RESTORE") != "1":
        return f"{host}:{sock.bind_to_random_port(f'tcp://{host}')}"
    address = store.get(key).decode()
    try:
        sock.bind(f"tcp://{address}")
    except zmq.ZMQError as exc:
        raise CorralError(
            f"parameter server {rank} cannot bind its port {address} again to restart "
            f"({exc}); another process took it"
        ) from exc
    return address


def serve(config: ServerConfig, keys: JobKeys) -> None:
    """Entry point of a server process (role ``server``); runs until the job stops it.

    Started again after a crash (``CORRAL_RESTORE=1``), it binds its old address, restores
    its newest shard checkpoint, and only then bumps its incarnation in the store, which
    tells waiting workers to send their requests again.
    """
    ctx = context()
    host = serving_host()
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    auth = start_authenticator(zctx, keys)
    sock = zctx.socket(zmq.ROUTER)
    secure_server(sock, keys)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        None,
        False,
        timeout=timedelta(minutes=5),
    )
    checkpoints = (
        ctx.checkpoint_dir / "servers" / f"shard-{ctx.rank}" if ctx.checkpoint_dir else None
    )
    server = _Server(sock, Shard(config), checkpoints)
    try:
        address = _bind(sock, host, store, ctx.rank)
        if os.environ.get("CORRAL_RESTORE") == "1":
            server.restore()
        else:
            store.set(ADDRESS_KEY.format(ctx.rank), address)
        store.add(INCARNATION_KEY.format(ctx.rank), 1)
        while True:
            ident, *frames = sock.recv_multipart(copy=False)
            header, arrays = unpack(frames)
            server.handle(ident.bytes, header, arrays)
    finally:
        auth.stop()
        sock.close(linger=0)
        zctx.term()
