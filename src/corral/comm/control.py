"""The control channel between the caller (driver) and its workers.

Workers report progress, metrics, their final result and their errors here rather than on
stdout, which belongs to the user's code. It is not on the training hot path, so messages
are plain pickled dicts over `multiprocessing.connection`, whose HMAC challenge on connect
authenticates every worker with the job's random key: a process that does not hold the key
cannot inject results. Any engine whose workers can reach the driver's address can use it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from typing import Any


@dataclass(frozen=True)
class Message:
    """One message from a worker; `body` is ``None`` when the worker's connection closed."""

    role: str
    rank: int
    body: dict[str, Any] | None
    received: float = field(default_factory=time.monotonic)


class ControlServer:
    """Driver side: accepts authenticated worker connections and queues their messages."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.authkey = secrets.token_bytes(32)
        self._listener = Listener((host, 0), authkey=self.authkey)
        self.address: tuple[str, int] = self._listener.address  # type: ignore[assignment]
        self.messages: queue.Queue[Message] = queue.Queue()
        self._conns: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="control-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except Exception:
                # a peer that failed the challenge or reset mid-way is ignored: only
                # close() ends the loop, or one bad peer would leave the rest unheard
                if self._closed:
                    return
                continue
            if self._closed:
                conn.close()
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: Connection) -> None:
        try:
            hello = conn.recv()
            role, rank = hello["role"], hello["rank"]
        except (EOFError, OSError, KeyError, TypeError):
            return
        while True:
            try:
                body = conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: closed by close() meanwhile
                self.messages.put(Message(role, rank, None))
                return
            self.messages.put(Message(role, rank, body))

    def close(self) -> None:
        """Stop accepting and drop every connection.

        Closing a socket does not wake a thread blocked in its ``accept`` on Linux: that
        thread, and the listening port, would live as long as the process (a service runs
        thousands of jobs). So close connects to itself once to wake it, then waits for it.
        """
        self._closed = True
        with contextlib.suppress(OSError):
            socket.create_connection(self.address, timeout=1.0).close()
        self._acceptor.join(timeout=5.0)
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                _shut(conn)
                conn.close()
            self._conns.clear()


class ControlClient:
    """Worker side: one authenticated connection to the driver."""

    def __init__(self, address: tuple[str, int], authkey: bytes, role: str, rank: int) -> None:
        self._conn = Client(address, authkey=authkey)
        self._lock = threading.Lock()
        self.send({"role": role, "rank": rank})

    def send(self, body: dict[str, Any]) -> None:
        """Send one message; safe from several threads."""
        with self._lock:
            self._conn.send(body)

    def close(self) -> None:
        self._conn.close()


def _shut(conn: Connection) -> None:
    """Wake a thread blocked reading `conn` (it sees end of file) before it is closed:
    closing alone leaves that read on a descriptor number the process may reuse."""
    with contextlib.suppress(OSError, ValueError):
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        with sock:
            sock.shutdown(socket.SHUT_RDWR)
