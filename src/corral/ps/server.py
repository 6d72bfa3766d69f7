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

Server 0 also hosts the job's membership (`corral.runtime.membership` decides; the server
carries out), so workers need no process group of their own (one that a dead peer would
break):

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

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import zmq

from corral.comm.curve import JobKeys, secure_server, start_authenticator
from corral.comm.frames import pack, unpack
from corral.errors import CorralError
from corral.ps.client import INCARNATION_KEY
from corral.ps.consistency import Update
from corral.ps.gradient import Gradient
from corral.ps.settings import ServerSettings, consistency_for
from corral.runtime import checkpoint as ckpt
from corral.runtime.context import context
from corral.runtime.membership import Decision, Membership, Share

#: The store key under which server `i` publishes its address.
ADDRESS_KEY = "corral/ps/server/{}"

#: A request handler: the requester's identity, the header and the arrays it sent.
Handler = Callable[[bytes, dict[str, Any], list[np.ndarray]], None]


class Shard:
    """One server's parameters, optimizer and consistency book-keeping."""

    def __init__(self, settings: ServerSettings, workers: int) -> None:
        self.settings = settings
        self.rules = consistency_for(settings, workers, average=Gradient.mean)
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
        args: dict[str, Any] = dict(self.settings.optimizer_args)  # torch's stubs type each apart
        if self.settings.optimizer == "sgd":
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
        return {
            "values": self.values.detach().clone(),
            "tables": [t.detach().clone() for t in self.tables],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "updates": self.updates,
            **self.rules.state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.init(state["values"].numpy(), [t.numpy() for t in state["tables"]])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.updates = state["updates"]
        self.rules.restore(state)

    def snapshot(self, tables: bool = False) -> list[np.ndarray]:
        """Copies (replies are sent without copying while later updates change the shard):
        the dense slice, and with `tables` every table's rows too."""
        assert self.values is not None
        parts = [self.values, *self.tables] if tables else [self.values]
        return [p.detach().numpy().copy() for p in parts]

    def rows(self, wanted: list[np.ndarray]) -> list[np.ndarray]:
        """Copies of the requested rows of each table (row numbers local to this shard)."""
        return [t.detach().numpy()[r] for t, r in zip(self.tables, wanted, strict=True)]


class _Server:
    """The request loop's state: the shard, parked requests, and the job's membership
    (which only server 0 is asked about, but every server keeps in step)."""

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
        self.members: Membership[bytes] = Membership(shard.rules.live)
        self.handlers: dict[str, Handler] = {
            "ping": self.on_ping,
            "init": self.on_init,
            "step": self.on_step,
            "pull": self.on_pull,
            "rows": self.on_rows,
            "leave": self.on_leave,
            "lost": self.on_lost,
            "epoch": self.on_epoch,
            "meet": self.on_meet,
            "join": self.on_join,
            "stats": self.on_stats,
        }

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

    def carry_out(self, decision: Decision[bytes]) -> None:
        """Do what membership decided: the admitted count for the consistency model from
        now on, and every reply goes out."""
        for worker in decision.admitted:
            self.shard.rules.join(worker)
        for reply in decision.replies:
            self.send(reply.to, reply.header, reply.arrays)

    def drop(self, worker: int, successor: int | None = None) -> dict[str, int]:
        """Forget `worker` (finished, or dead with `successor` started in its place, if
        any); returns what it had done of its last epoch."""
        rules = self.shard.rules
        clock = rules.clocks.get(worker, 0)
        if successor is None:
            done, decision = self.members.leave(worker, clock=clock)
        else:
            done, decision = self.members.lost(worker, successor=successor, clock=clock)
        self.shard.apply(rules.leave(worker))
        self.parked = [p for p in self.parked if p[1] != worker]
        self.release_parked()
        self.carry_out(decision)
        return done

    def checkpoint(self) -> None:
        """Save the shard if `checkpoint_every` updates were applied since the last save."""
        every = self.shard.settings.checkpoint_every
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
        self.members = Membership(self.shard.rules.live)
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
        """Answer one request (now, or once the consistency model or a meeting allows)."""
        self.bytes_moved += sum(a.nbytes for a in arrays)
        handler = self.handlers.get(header["op"])
        if handler is None:
            self.send(ident, {"error": f"unknown operation '{header['op']}'"})
        else:
            handler(ident, header, arrays)

    def on_ping(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.send(ident, {})

    def on_init(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.shard.init(arrays[0], arrays[1:])
        self.send_values(ident, tables=True)

    def on_step(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        grad = Gradient.from_arrays(arrays)
        problem = self.mismatch(grad)
        if problem:
            self.send(ident, {"error": f"{problem}: did the model's parameters change shape?"})
            return
        worker, rules = header["worker"], self.shard.rules
        if header["seq"] > self.last_push.get(worker, -1):  # else: a resent copy
            self.last_push[worker] = header["seq"]
            self.count_lost(worker, header["version"])
            self.shard.apply(rules.push(worker, grad, header["version"]))
            self.members.add(worker)  # known already, unless this server was restarted
            self.checkpoint()
        self.parked.append((ident, worker, rules.clocks[worker]))
        self.release_parked()

    def on_pull(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.send_values(ident, tables=True)

    def on_rows(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.send(ident, {}, self.shard.rows(arrays))

    def on_leave(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.drop(header["worker"])
        self.send(ident, {})

    def on_lost(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.send(ident, self.drop(header["worker"], header["successor"]))

    def on_epoch(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        share = Share(
            epoch=header["epoch"],
            steps=header["steps"],
            samples=header["samples"],
            clock=self.shard.rules.clocks.get(header["worker"], 0),
        )
        self.members.begin_epoch(header["worker"], share)
        self.send(ident, {})

    def on_meet(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        worker, epoch = header["worker"], header["epoch"]
        self.carry_out(self.members.meet(ident, worker=worker, epoch=epoch, sums=arrays[0]))

    def on_join(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.carry_out(self.members.join(ident, worker=header["worker"]))

    def on_stats(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.send(
            ident,
            {
                "histogram": {str(k): v for k, v in sorted(self.shard.rules.histogram.items())},
                "updates": self.shard.updates,
                "bytes": self.bytes_moved,
                "seconds": time.monotonic() - self.started,
                "lost_updates": self.lost_updates,
            },
        )


def _bind(sock: zmq.Socket[bytes], host: str, store: dist.Store, rank: int, again: bool) -> str:
    """Bind a fresh port, or after a restart (`again`) the old one, which clients
    reconnect to."""
    key = ADDRESS_KEY.format(rank)
    if not again:
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


def serve(settings: ServerSettings, workers: int, keys: JobKeys) -> None:
    """Entry point of a server process (role ``server``) of a job of `workers` workers;
    runs until the job stops it.

    Started again after a crash (``CORRAL_RESTORE=1``), it binds its old address, restores
    its newest shard checkpoint, and only then bumps its incarnation in the store, which
    tells waiting workers to send their requests again.
    """
    ctx = context()
    host = ctx.serving_host
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    auth = start_authenticator(zctx, keys)
    sock = zctx.socket(zmq.ROUTER)
    secure_server(sock, keys)
    store = ctx.store
    checkpoints = (
        ctx.checkpoint_dir / "servers" / f"shard-{ctx.rank}" if ctx.checkpoint_dir else None
    )
    server = _Server(sock, Shard(settings, workers), checkpoints)
    try:
        address = _bind(sock, host, store, ctx.rank, again=ctx.restoring)
        if ctx.restoring:
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
