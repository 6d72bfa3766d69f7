"""Per-job authentication of every ZeroMQ connection with CURVE.

Each job gets two fresh keypairs: one for its servers and one shared by its clients
(workers). A server only completes the CURVE handshake with a peer that proves it holds
the job's *client* secret key (checked by a ZAP handler allowing exactly that public key),
and a client only talks to a server that proves it holds the job's *server* secret key. A
process without the job's keys can neither push nor pull; traffic is also encrypted.
Keys travel to processes inside the job's payload file (mode 0600), never in logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator


@dataclass(frozen=True, repr=False)
class JobKeys:
    """The job's CURVE keys (Z85 text). `repr` hides them so they never reach a log."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> JobKeys:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def __repr__(self) -> str:
        return "JobKeys(<hidden>)"


#: The ZAP domain of corral's servers; the authenticator answers for this domain only.
ZAP_DOMAIN = "corral"


class _OnlyJobClients:
    """ZAP credentials provider: accepts exactly the job's client public key."""

    def __init__(self, allowed: bytes) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.allowed


def start_authenticator(
    context: zmq.Context[zmq.Socket[bytes]], keys: JobKeys
) -> ThreadAuthenticator:
    """Run the ZAP handler of a server process; stop it with ``.stop()`` at exit."""
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback(
        domain=ZAP_DOMAIN, credentials_provider=_OnlyJobClients(keys.client_public)
    )
    return auth


def secure_server(socket: zmq.Socket[bytes], keys: JobKeys) -> None:
    """Make `socket` a CURVE server for this job (call before ``bind``)."""
    socket.curve_server = True
    socket.curve_secretkey = keys.server_secret
    socket.curve_publickey = keys.server_public
    socket.zap_domain = ZAP_DOMAIN.encode()


def secure_client(socket: zmq.Socket[bytes], keys: JobKeys) -> None:
    """Make `socket` a CURVE client of this job's servers (call before ``connect``)."""
    socket.curve_serverkey = keys.server_public
    socket.curve_publickey = keys.client_public
    socket.curve_secretkey = keys.client_secret


class SecureRouter:
    """A ROUTER socket in a context of its own, bound to a free port of `host`, that
    completes the handshake only with the job's clients: what a process serving its
    peers on a thread (a gossip mailbox, the driver's membership host) starts with."""

    def __init__(self, keys: JobKeys, host: str) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth = start_authenticator(self.context, keys)
        self.sock = self.context.socket(zmq.ROUTER)
        secure_server(self.sock, keys)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port: int = self.sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"{host}:{self.port}"

    def close(self) -> None:
        self._auth.stop()
        self.sock.close(linger=0)
        self.context.term()
