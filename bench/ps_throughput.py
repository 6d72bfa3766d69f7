"""Claim: corral's parameter server moves a big model at >= 50% of raw TCP and >= 10x Elephas.

Measures push + pull throughput (bytes per second, both directions counted) of corral's
parameter server — 2 servers (``corral.ps.server.serve``), 2 workers (``PSClient.step``:
push the gradient shards, pull fresh values from both servers in parallel; async mode,
one SGD update per push, CURVE-encrypted ZeroMQ) — for a model of ``--params`` float32
parameters (default 100M = 400 MB), against, in the same run:

* raw loopback TCP: one sender process ``sendall``-ing 4 MiB or 64 MiB buffers to one
  receiver process doing ``recv_into``, for 2 s, once before and once after the PS runs —
  the physical limit of this machine is the best of these runs (loopback on a small,
  shared VM is noisy, and the best buffer size depends on the caches);
* one CURVE-encrypted ZeroMQ stream (PUSH → PULL, 4 MiB messages, the job's kind of keys
  and ZAP handler) for 2 s: the limit of the encrypted, authenticated transport every
  corral connection must use, with no parameter-server work at all;
* an Elephas-style parameter server written here as the baseline: ONE
  ``ThreadingHTTPServer`` process holding the whole model as a numpy array; workers POST
  pickled gradients (``/update``: ``weights = weights - delta`` under a lock) and GET the
  pickled weights (``/parameters``), with ``urllib``, as Elephas does with Flask + pickle
  on the Spark driver.

Both PS systems do 1 warm-up step per worker, then both workers pass a barrier and time
``--steps`` steps; throughput = all workers' bytes / the slower worker's seconds, where one
step of one worker moves ``2 x params x 4`` bytes. ratios: corral / raw TCP (target >= 0.5)
and corral / elephas-style (target >= 10).

Run: ``.venv/bin/python bench/ps_throughput.py`` (``--params 10000000`` for a quick run;
``--help`` for steps and durations).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import http.server
import multiprocessing as mp
import os
import pickle
import platform
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from typing import Any

import numpy as np

SERVERS = 2
WORKERS = 2
MB = 1e6


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- corral


def corral_worker(keys: Any, numel: int, warmup: int, steps: int) -> list[tuple[int, float]]:
    """One worker: init, warm up, barrier, time `steps` pushes + pulls; rank 0 gets all."""
    import torch.distributed as dist

    from corral.ps.client import PSClient
    from corral.ps.layout import Layout
    from corral.ps.server import ADDRESS_KEY

    rank = int(os.environ["RANK"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        None,
        False,
        timeout=datetime.timedelta(seconds=60),
    )
    addresses = [store.get(ADDRESS_KEY.format(i)).decode() for i in range(SERVERS)]
    dist.init_process_group("gloo")
    client = PSClient(addresses, keys, worker=rank)
    layout = Layout.split(numel, SERVERS)
    client.init(np.ones(numel, dtype=np.float32), layout)
    grad = np.full(numel, 1e-3, dtype=np.float32)
    for _ in range(warmup):
        client.step(grad, layout)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        client.step(grad, layout)
    seconds = time.perf_counter() - start
    client.close()
    gathered: list[Any] = [None] * WORKERS
    dist.all_gather_object(gathered, (steps * 2 * numel * 4, seconds))
    dist.destroy_process_group()
    return gathered


def run_corral(numel: int, warmup: int, steps: int) -> list[tuple[int, float]]:
    from corral.comm.curve import JobKeys
    from corral.ps.server import serve
    from corral.ps.settings import ServerSettings
    from corral.runtime.roles import Role
    from corral.train.launcher import LaunchOptions, launch

    keys = JobKeys.generate()
    settings = ServerSettings(mode="async", optimizer_args={"lr": 0.01})
    servers = Role(name="server", count=SERVERS, fn=serve, args=(settings, WORKERS, keys))
    return launch(
        corral_worker,
        (keys, numel, warmup, steps),
        LaunchOptions(workers=WORKERS, helpers=(servers,)),
    )


# --------------------------------------------------------------------------- raw TCP


def tcp_receiver(listener: socket.socket, chunk: int, out: Connection) -> None:
    conn, _ = listener.accept()
    buf = bytearray(chunk)
    view = memoryview(buf)
    total, first, last = 0, 0.0, 0.0
    while True:
        n = conn.recv_into(view)
        if n == 0:
            break
        if total == 0:
            first = time.perf_counter()
        total += n
        last = time.perf_counter()
    conn.close()
    out.send((total, last - first))


def tcp_sender(port: int, chunk: int, seconds: float) -> None:
    data = np.ones(chunk, dtype=np.uint8).data
    with socket.create_connection(("127.0.0.1", port)) as sock:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            sock.sendall(data)


def run_tcp(chunk: int, seconds: float) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    here, there = ctx.Pipe(duplex=False)
    receiver = ctx.Process(target=tcp_receiver, args=(listener, chunk, there))
    sender = ctx.Process(target=tcp_sender, args=(port, chunk, seconds))
    receiver.start()
    sender.start()
    sender.join()
    result = here.recv()
    receiver.join()
    listener.close()
    return result


# --------------------------------------------------------------------------- CURVE stream


def curve_receiver(keys: Any, port_out: Connection, out: Connection) -> None:
    import zmq

    from corral.comm.curve import secure_server, start_authenticator

    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    auth = start_authenticator(zctx, keys)
    sock = zctx.socket(zmq.PULL)
    sock.rcvhwm = 4
    secure_server(sock, keys)
    port_out.send(sock.bind_to_random_port("tcp://127.0.0.1"))
    total, first, last = 0, 0.0, 0.0
    while True:
        frame = sock.recv(copy=False)
        if len(frame) == 0:
            break
        if total == 0:
            first = time.perf_counter()
        total += len(frame)
        last = time.perf_counter()
    out.send((total, last - first))
    auth.stop()
    sock.close(linger=0)
    zctx.term()


def curve_sender(keys: Any, port: int, chunk: int, seconds: float) -> None:
    import zmq

    from corral.comm.curve import secure_client

    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = zctx.socket(zmq.PUSH)
    sock.sndhwm = 4
    secure_client(sock, keys)
    sock.connect(f"tcp://127.0.0.1:{port}")
    data = np.ones(chunk, dtype=np.uint8)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sock.send(data, copy=False)
    sock.send(b"")
    sock.close(linger=-1)
    zctx.term()


def run_curve(chunk: int, seconds: float) -> tuple[int, float]:
    """One CURVE-encrypted ZeroMQ stream between two processes: the limit of an encrypted,
    authenticated transport here (corral's own, without any parameter-server work)."""
    from corral.comm.curve import JobKeys

    keys = JobKeys.generate()
    ctx = mp.get_context("spawn")
    port_here, port_there = ctx.Pipe(duplex=False)
    here, there = ctx.Pipe(duplex=False)
    receiver = ctx.Process(target=curve_receiver, args=(keys, port_there, there))
    receiver.start()
    sender = ctx.Process(target=curve_sender, args=(keys, port_here.recv(), chunk, seconds))
    sender.start()
    sender.join()
    result = here.recv()
    receiver.join()
    return result


# --------------------------------------------------------------------------- Elephas-style


class _ElephasHandler(http.server.BaseHTTPRequestHandler):
    """Elephas' ``HttpServer`` routes: GET /parameters, POST /update (pickle both ways)."""

    weights: np.ndarray
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            body = pickle.dumps(type(self).weights, -1)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        delta = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            cls = type(self)
            cls.weights = cls.weights - delta  # elephas: subtract_params(weights, delta)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet, like Flask in prod
        pass


def elephas_server(listener: socket.socket, numel: int) -> None:
    _ElephasHandler.weights = np.ones(numel, dtype=np.float32)
    server = http.server.ThreadingHTTPServer(
        listener.getsockname(), _ElephasHandler, bind_and_activate=False
    )
    server.socket.close()
    server.socket = listener
    server.serve_forever()


def elephas_worker(
    url: str, numel: int, warmup: int, steps: int, barrier: Barrier, out: Connection
) -> None:
    grad = np.full(numel, 1e-5, dtype=np.float32)

    def step() -> np.ndarray:
        request = urllib.request.Request(
            url + "/update",
            pickle.dumps(grad, -1),
            headers={"Content-Type": "application/elephas"},
        )
        urllib.request.urlopen(request).read()
        return pickle.loads(urllib.request.urlopen(url + "/parameters").read())

    pickle.loads(urllib.request.urlopen(url + "/parameters").read())  # as Elephas' first pull
    for _ in range(warmup):
        step()
    barrier.wait()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    out.send((steps * 2 * numel * 4, time.perf_counter() - start))


def run_elephas(numel: int, warmup: int, steps: int) -> list[tuple[int, float]]:
    ctx = mp.get_context("spawn")
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = ctx.Process(target=elephas_server, args=(listener, numel), daemon=True)
    server.start()
    barrier = ctx.Barrier(WORKERS)
    pipes = [ctx.Pipe(duplex=False) for _ in range(WORKERS)]
    workers = [
        ctx.Process(target=elephas_worker, args=(url, numel, warmup, steps, barrier, there))
        for _, there in pipes
    ]
    try:
        for w in workers:
            w.start()
        results = [here.recv() for here, _ in pipes]
        for w in workers:
            w.join()
    finally:
        server.terminate()
        server.join()
        listener.close()
    return results


# --------------------------------------------------------------------------- report


def throughput(results: list[tuple[int, float]]) -> float:
    """All workers' bytes over the slower worker's seconds."""
    return sum(b for b, _ in results) / max(s for _, s in results)


def timed(name: str, fn: Callable[[], Any]) -> Any:
    log(f"{name}: running")
    start = time.perf_counter()
    out = fn()
    log(f"{name}: done in {time.perf_counter() - start:.1f} s")
    return out


def main() -> None:
    import torch  # here, not at the top: spawned baseline processes need not import it
    import zmq

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=100_000_000, help="float32 parameters")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per corral worker")
    parser.add_argument(
        "--elephas-steps", type=int, default=None, help="timed steps per Elephas-style worker"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per worker")
    parser.add_argument("--tcp-seconds", type=float, default=2.0, help="per raw TCP run")
    parser.add_argument(
        "--chunk-mib",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[4, 64],
        help="raw TCP send/recv buffer sizes, comma-separated (each one is its own row)",
    )
    parser.add_argument("--skip-elephas", action="store_true")
    args = parser.parse_args()
    numel = args.params
    elephas_steps = args.elephas_steps or args.steps

    tcp_runs: dict[int, list[float]] = {mib: [] for mib in args.chunk_mib}

    def tcp_round(when: str) -> None:
        for mib in args.chunk_mib:
            name = f"raw TCP {mib} MiB ({when})"
            sent, seconds = timed(name, functools.partial(run_tcp, mib * 2**20, args.tcp_seconds))
            log(f"{name}: {sent / seconds / MB:.0f} MB/s")
            tcp_runs[mib].append(sent / seconds)

    tcp_round("before")
    curve_sent, curve_seconds = timed(
        "CURVE stream", functools.partial(run_curve, 4 * 2**20, args.tcp_seconds)
    )
    curve = curve_sent / curve_seconds
    log(f"CURVE ZeroMQ stream 4 MiB: {curve / MB:.0f} MB/s")
    ours_results = timed("corral PS", lambda: run_corral(numel, args.warmup, args.steps))
    ours = throughput(ours_results)
    log(f"corral PS: {ours / MB:.0f} MB/s ({ours_results})")
    theirs: float | None = None
    if not args.skip_elephas:
        theirs_results = timed(
            "Elephas-style PS", lambda: run_elephas(numel, args.warmup, elephas_steps)
        )
        theirs = throughput(theirs_results)
        log(f"Elephas-style PS: {theirs / MB:.0f} MB/s ({theirs_results})")
    tcp_round("after")
    # The limit is the best run: loopback on a small shared VM is noisy, and the best buffer
    # size depends on the machine's caches.
    tcp = max(max(runs) for runs in tcp_runs.values())

    print(
        f"\nPush + pull throughput, {numel / 1e6:g}M float32 parameters "
        f"({numel * 4 / MB:.0f} MB), {WORKERS} workers; MB = 10^6 bytes, both directions "
        f"counted; {os.cpu_count()} cores, torch {torch.__version__}, "
        f"libzmq {zmq.zmq_version()}, python {platform.python_version()}, "
        f"{platform.machine()}\n"
    )
    print("| system | timed work | MB/s | ratio (corral / this) |")
    print("|---|---|---:|---:|")
    print(
        f"| corral PS: {SERVERS} servers, CURVE ZeroMQ, async SGD | "
        f"{args.steps} steps/worker after {args.warmup} warm-up | {ours / MB:.0f} | — |"
    )
    for mib, runs in tcp_runs.items():
        each = ", ".join(f"{t / MB:.0f}" for t in runs)
        print(
            f"| raw loopback TCP, 1 stream, {mib} MiB sendall/recv_into | "
            f"{args.tcp_seconds:g} s before and after the rest ({each} MB/s); the better | "
            f"{max(runs) / MB:.0f} | {ours / max(runs):.2f} |"
        )
    print(
        f"| CURVE ZeroMQ stream, 1 PUSH→PULL, 4 MiB messages (the encrypted transport's limit) | "
        f"{args.tcp_seconds:g} s | {curve / MB:.0f} | {ours / curve:.2f} |"
    )
    if theirs is None:
        print("| Elephas-style: 1 HTTP server, pickle | skipped | | |")
    else:
        print(
            f"| Elephas-style: 1 HTTP server, pickle | {elephas_steps} steps/worker after "
            f"{args.warmup} warm-up | {theirs / MB:.0f} | {ours / theirs:.1f}x |"
        )
    print(
        f"\ncorral / raw TCP (best row, {tcp / MB:.0f} MB/s) = {ours / tcp:.2f} (target >= 0.50); "
        + (f"corral / Elephas-style = {ours / theirs:.1f}x" if theirs else "Elephas-style skipped")
        + " (target >= 10x)."
        f" corral / CURVE stream = {ours / curve:.2f}."
    )


if __name__ == "__main__":
    main()
