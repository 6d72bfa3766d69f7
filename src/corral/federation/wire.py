"""What an aggregator and its real clients say to each other, and the address that joins.

The transport is the parameter server's: ZeroMQ with CURVE, so every byte is encrypted
and the client knows it talks to this job's aggregator (the address carries the
aggregator's public key). Clients bring keys of their own; what admits one is the job's
enrolment token in its first message, compared in constant time, so a wrong token is
told so in one line rather than left waiting on a handshake that never completes.

Messages are `corral.comm.frames` messages: a JSON header and raw float32 buffers.

- client → aggregator: ``hello`` (token, name, samples, parameter count), ``ping``
  (idle; so a restarted aggregator learns it is there), ``update`` (round, samples,
  loss sums, compute seconds; the update vector).
- aggregator → client: ``welcome`` (the job's settings for clients), ``refused`` (why),
  ``who`` (an aggregator that restarted does not know it: say hello again), ``train``
  (round; the global weights), ``done``.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from corral.errors import SpecError

SCHEME = "corral"
#: The enrolment file in an aggregator's folder: keys, address and token (mode 0600).
ENROLMENT = "enrolment.json"


@dataclass(frozen=True, repr=False)
class JoinAddress:
    """Where an aggregator listens, its CURVE public key (Z85) and the job's token.

    `repr` hides the token: it never reaches a log.
    """

    host: str
    port: int
    server_key: bytes
    token: str

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def url(self) -> str:
        """``corral://HOST:PORT/?key=…&token=…``: what ``corral fl join`` takes."""
        from zmq.utils import z85

        key = z85.decode(self.server_key).hex()
        query = urllib.parse.urlencode({"key": key, "token": self.token})
        return f"{SCHEME}://{self.host}:{self.port}/?{query}"

    @classmethod
    def parse(cls, url: str) -> JoinAddress:
        """The address in `url`, or a `SpecError` saying what is wrong with it."""
        from zmq.utils import z85

        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        if parts.scheme != SCHEME or not parts.hostname or not parts.port:
            raise SpecError(f"'{_shown(url)}' is not a corral://HOST:PORT/?key=…&token=… address")
        try:
            key = z85.encode(bytes.fromhex(query["key"][0]))
            token = query["token"][0]
        except (KeyError, ValueError):
            raise SpecError(f"no key or token in '{_shown(url)}': copy the whole address") from None
        return cls(parts.hostname, parts.port, key, token)

    @classmethod
    def enrolled(cls, folder: Path) -> JoinAddress | None:
        """The address of the aggregator whose folder is `folder`, read from its
        enrolment file; None before it first listened."""
        try:
            saved = json.loads((folder / ENROLMENT).read_text())
            return cls(saved["host"], saved["port"], saved["sp"].encode(), saved["token"])
        except (OSError, ValueError, KeyError):
            return None

    def __repr__(self) -> str:
        return f"JoinAddress({self.host}:{self.port}, <token hidden>)"


def _shown(url: str) -> str:
    """`url` with its token cut off, for messages."""
    return url.split("token=")[0] + ("token=…" if "token=" in url else "")
