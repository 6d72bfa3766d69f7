"""Secure aggregation with real clients: the aggregator learns only a round's sum.

The protocol is `corral.federated.secagg` (SecAgg+, Bell et al. 2020, on Bonawitz et al.
2017), whose parties exchange bytes; here the aggregator is its server and routes the
messages between the round's sampled clients over the job's CURVE connections, in four
exchanges, each closing when every party still in answered or at the round's timeout:

1. ``secagg_keys`` (the round's public settings and the client's protocol id) → each
   client's two X25519 public keys; the aggregator sends each its neighbours' keys.
2. ``secagg_roster`` → each client's Shamir shares of its secrets, encrypted to each
   neighbour; the aggregator forwards every ciphertext to its recipient.
3. ``train`` (the global weights and the shares routed to it) → the client trains,
   clips and quantises its update and sends it masked by its pairwise and self masks,
   with its loss sums: the only vector that leaves it, indistinguishable from noise.
4. ``secagg_unmask`` (who dropped, who survived) → each survivor's shares of the
   dropped clients' mask keys and of the survivors' self-mask seeds; the masks cancel,
   and what is left is the sum of the survivors' quantised updates.

Clients that drop after sharing have their masks removed from their neighbours' shares;
more dropouts than a neighbourhood's threshold fail the round (`SecAggError`): the model
stays as it was, and nothing about any update was revealed. Clients weigh the same.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from corral.comm import frames
from corral.federated import secagg
from corral.federated.secure import SecureAggregation

#: One exchange of the aggregator: send each identity its (header, arrays); returns each
#: answer of the expected kind, by identity, as (the first array, the header).
Exchange = Callable[
    [dict[bytes, tuple[dict[str, Any], list[np.ndarray]]], str],
    dict[bytes, tuple[np.ndarray, dict[str, Any]]],
]


def _blob(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


@dataclass(frozen=True)
class SecureOutcome:
    """What one secure round revealed: the survivors' float sum (None if the round
    failed), the headers of the survivors' ``update`` messages, and bytes per client."""

    total: np.ndarray | None
    reported: list[tuple[np.ndarray, dict[str, Any]]]
    bytes_per_client: float
    failure: str | None = None


def serve_round(
    settings: SecureAggregation,
    exchange: Exchange,
    sampled: list[bytes],
    weights: np.ndarray,
    *,
    seed: int,
    index: int,
) -> SecureOutcome:
    """Run secure round `index` with the `sampled` clients through `exchange`."""
    ids = {identity: i + 1 for i, identity in enumerate(sampled)}  # 0 is Shamir's secret
    by_id = {i: identity for identity, i in ids.items()}
    degree, threshold = settings.graph(len(sampled))
    public = hashlib.sha256(f"corral secagg {seed} {index}".encode()).digest()
    config = secagg.SecAggConfig(
        dim=len(weights), bits=settings.bits, threshold=threshold, degree=degree, round_seed=public
    )
    terms = {
        "dim": config.dim,
        "bits": config.bits,
        "threshold": threshold,
        "degree": degree,
        "seed": public.hex(),
        "clients": len(sampled),
        "clip": settings.clip,
    }
    server = secagg.SecAggServer(config)
    sent = 0

    def step(
        kind: str, messages: dict[int, Any], answer: str, *extra: np.ndarray
    ) -> dict[bytes, tuple[np.ndarray, dict[str, Any]]]:
        """Send each protocol id its message of `kind` (after `extra` arrays); the
        answers of kind `answer` that came."""
        nonlocal sent
        out = {
            by_id[i]: ({"kind": kind}, [*extra, _blob(m.to_bytes())]) for i, m in messages.items()
        }
        answers = exchange(out, answer)
        sent += sum(a.nbytes for a, _ in answers.values())
        return answers

    def read(cls: Any, answers: dict[bytes, tuple[np.ndarray, dict[str, Any]]]) -> Any:
        return (cls.from_bytes(a.tobytes()) for a, _ in answers.values())

    try:
        keys = exchange(
            {c: ({"kind": "secagg_keys", "id": ids[c], **terms}, []) for c in sampled}, "keys"
        )
        sent += sum(a.nbytes for a, _ in keys.values())
        rosters = server.collect_keys(read(secagg.KeyAdvert, keys))
        shared = step("secagg_roster", rosters, "shares")
        routed = server.route_shares(read(secagg.EncryptedShares, shared))
        masked = step("train", routed, "update", weights)
        requests = server.collect_masked(read(secagg.MaskedInput, masked))
        answers = step("secagg_unmask", requests, "unmask")
        total = server.aggregate(read(secagg.UnmaskResponse, answers))
    except secagg.SecAggError as exc:
        return SecureOutcome(None, [], sent / len(sampled), failure=str(exc))
    survivors = [by_id[i] for i in server.survivors]
    quantizer = secagg.Quantizer(clip=settings.clip, bits=settings.bits, clients=len(sampled))
    float_sum = quantizer.dequantize_sum(total, summands=len(survivors)).astype(np.float32)
    reported = [masked[c] for c in survivors]
    return SecureOutcome(float_sum, reported, sent / len(sampled))


class SecureClient:
    """A real client's side of the secure rounds: one protocol party per round."""

    def __init__(self) -> None:
        self.round: int | None = None
        self._party: secagg.SecAggClient | None = None
        self._quantizer: secagg.Quantizer | None = None

    def keys(self, header: dict[str, Any]) -> list[Any]:
        """Step 1: a fresh party for this round; its public keys."""
        config = secagg.SecAggConfig(
            dim=int(header["dim"]),
            bits=int(header["bits"]),
            threshold=int(header["threshold"]),
            degree=header["degree"],
            round_seed=bytes.fromhex(header["seed"]),
        )
        self.round = int(header["round"]) if "round" in header else None
        self._party = secagg.SecAggClient(int(header["id"]), config, randomness=os.urandom)
        self._quantizer = secagg.Quantizer(
            clip=float(header["clip"]), bits=config.bits, clients=int(header["clients"])
        )
        advert = self._party.advertise_keys().to_bytes()
        return frames.pack({"kind": "keys", "round": self.round}, [_blob(advert)])

    def shares(self, roster: np.ndarray) -> list[Any]:
        """Step 2: its secrets' shares, encrypted to its neighbours."""
        assert self._party is not None
        bundle = self._party.share_keys(secagg.Roster.from_bytes(roster.tobytes()))
        return frames.pack({"kind": "shares", "round": self.round}, [_blob(bundle.to_bytes())])

    @property
    def active(self) -> bool:
        """Whether a secure round is under way (its ``train`` wants a masked update)."""
        return self._party is not None

    def mask(self, update: np.ndarray, routed: np.ndarray) -> np.ndarray:
        """Step 3: the update, quantised (stochastic rounding) and masked."""
        assert self._party is not None and self._quantizer is not None
        q = self._quantizer.quantize(update, np.random.default_rng())
        shares = secagg.RoutedShares.from_bytes(routed.tobytes())
        return _blob(self._party.mask_input(q, shares).to_bytes())

    def unmask(self, request: np.ndarray) -> list[Any]:
        """Step 4: the shares that remove the masks; the round's party is done."""
        assert self._party is not None
        answer = self._party.unmask(secagg.UnmaskRequest.from_bytes(request.tobytes()))
        header = {"kind": "unmask", "round": self.round}
        self._party = self._quantizer = None
        return frames.pack(header, [_blob(answer.to_bytes())])
