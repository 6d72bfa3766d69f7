"""Secure aggregation: the server learns the sum of the clients' integer vectors, nothing else.

Implements the semi-honest protocol of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017), with the sparse neighbour graph of Bell
et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS 2020,
"SecAgg+"): each client masks with, and secret-shares to, only ``degree`` neighbours of a
k-regular graph drawn from the round's public randomness, so its cost grows with
log n instead of n. ``degree=None`` (or ≥ n − 1) is the classic complete graph.

Rounds, as in the paper (each party is a plain object; every message is a dataclass with
``to_bytes``/``from_bytes``, so the same code runs in one process or over a network):

0. ``advertise_keys``: each client makes two X25519 key pairs, c (to encrypt shares) and
   s (to agree on masks), and sends the public halves.
1. ``share_keys``: each client Shamir-shares (threshold t) its s secret key and a fresh
   self-mask seed b among its neighbours, each share AES-GCM-encrypted under HKDF(X25519(c)),
   routed by the server.
2. ``mask_input``: y = x + PRG(b) + Σ_j ±PRG(s_ij) mod 2^bits over the neighbours j whose
   shares arrived (+ when i < j), s_ij = HKDF(X25519(s)).
3. ``unmask``: survivors send shares of each surviving neighbour's b and of each dropped
   neighbour's s key, never both for one peer; the server rebuilds the seeds and removes the
   masks. The pair masks between survivors cancel in the sum.

Threat model: an honest-but-curious server and clients. The malicious-server variant's
consistency round and signed keys are not implemented; a lying server that tells
different clients different dropout sets is out of scope (each client still refuses to
reveal both secrets of one peer). The threshold must exceed the number of a client's
neighbours that may collude with the server, and every needed neighbourhood must keep at
least ``threshold`` survivors, else the round fails with `SecAggError` and reveals nothing.

Example:
    >>> inputs = {i: np.full(4, i, dtype=np.uint64) for i in range(6)}
    >>> secure_sum(inputs, bits=16, threshold=3, dropped_before_masking={5}, seed=0).tolist()
    [10, 10, 10, 10]
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from corral.errors import CorralError

__all__ = [
    "FIELD_PRIME",
    "ROUNDS",
    "EncryptedShares",
    "KeyAdvert",
    "MaskedInput",
    "Quantizer",
    "Roster",
    "RoutedShares",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggReport",
    "SecAggServer",
    "UnmaskRequest",
    "UnmaskResponse",
    "expand_mask",
    "field_to_secret",
    "neighbour_graph",
    "secret_to_field",
    "secure_sum",
    "shamir_combine",
    "shamir_split",
    "simulate_round",
]

FIELD_PRIME = 2**31 - 1
"""Shamir's field: products of two elements fit in uint64, so sharing is numpy-vectorised.
Shamir hides a secret perfectly in any field; the size only bounds the parties (< 2^31)."""
_CHUNK_BITS = 30
_CHUNKS = 9  # a 32-byte secret as nine 30-bit field elements
_SHARE_BYTES = 4 * _CHUNKS
_MAX_ID = FIELD_PRIME - 2  # a share's x-coordinate is id + 1, nonzero and < p
ROUNDS = ("advertise", "share", "mask", "unmask")

Randomness = Callable[[int], bytes]


class SecAggError(CorralError):
    """A secure-aggregation round cannot finish (too few survivors) or a party refuses."""


# --- Shamir secret sharing over GF(2^31 - 1) ---


def secret_to_field(secret: bytes) -> np.ndarray:
    """Split a 32-byte secret into nine 30-bit field elements (little-endian chunks)."""
    if len(secret) != 32:
        raise ValueError(f"a secret must be 32 bytes, got {len(secret)}")
    value = int.from_bytes(secret, "little")
    mask = (1 << _CHUNK_BITS) - 1
    return np.array([(value >> (_CHUNK_BITS * k)) & mask for k in range(_CHUNKS)], np.uint64)


def field_to_secret(elements: np.ndarray) -> bytes:
    """Join nine field elements back into 32 bytes; ValueError if they encode no secret."""
    chunks = [int(c) for c in np.asarray(elements).ravel()]
    if len(chunks) != _CHUNKS or any(c >> _CHUNK_BITS for c in chunks):
        raise ValueError("these field elements are not the encoding of a 32-byte secret")
    value = sum(c << (_CHUNK_BITS * k) for k, c in enumerate(chunks))
    if value >> 256:
        raise ValueError("these field elements are not the encoding of a 32-byte secret")
    return value.to_bytes(32, "little")


def _field_randoms(randomness: Randomness, count: int) -> np.ndarray:
    # 64 random bits reduced mod p: the bias, p / 2^64 < 2^-32, is negligible
    return np.frombuffer(randomness(8 * count), "<u8").astype(np.uint64) % np.uint64(FIELD_PRIME)


def _check_xs(xs: Sequence[int]) -> np.ndarray:
    if len(set(xs)) != len(xs) or any(not 0 < x < FIELD_PRIME for x in xs):
        raise ValueError(f"share x-coordinates must be distinct and in [1, {FIELD_PRIME - 1}]")
    return np.asarray(xs, dtype=np.uint64)


def shamir_split(
    secret: np.ndarray, xs: Sequence[int], threshold: int, randomness: Randomness = os.urandom
) -> np.ndarray:
    """Share each element of `secret` so that any `threshold` of the shares rebuild it.

    One random polynomial of degree ``threshold - 1`` per element, all evaluated at once
    by Horner's rule on ``(len(xs), len(secret))`` arrays.

    Returns:
        ``shares[i]``, the share for x-coordinate ``xs[i]``, one field element per element.
    """
    p = np.uint64(FIELD_PRIME)
    values = np.asarray(secret, dtype=np.uint64)
    if values.ndim != 1 or bool((values >= p).any()):
        raise ValueError(f"a secret must be a 1-D vector of field elements < {FIELD_PRIME}")
    x = _check_xs(xs)[:, None]
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}] (the shares), got {threshold}")
    coeffs = _field_randoms(randomness, (threshold - 1) * len(values))
    acc = np.zeros((len(xs), len(values)), np.uint64)
    for c in [*coeffs.reshape(threshold - 1, len(values))[::-1], values]:
        acc = (acc * x + c) % p
    return acc


def shamir_combine(xs: Sequence[int], shares: np.ndarray) -> np.ndarray:
    """Lagrange-interpolate the shares at 0: the secret if at least its threshold are given.

    With fewer shares than the threshold the result is a uniformly random wrong value.
    """
    p = np.uint64(FIELD_PRIME)
    x = _check_xs(xs)
    rows = np.asarray(shares, dtype=np.uint64)
    if rows.ndim != 2 or rows.shape[0] != len(xs):
        raise ValueError(f"need one row of shares per x-coordinate, got shape {rows.shape}")
    diff = (x[None, :] + p - x[:, None]) % p  # diff[i, j] = x_j - x_i
    num, den = np.ones(len(x), np.uint64), np.ones(len(x), np.uint64)
    for j in range(len(x)):
        keep = np.arange(len(x)) != j
        num[keep] = num[keep] * x[j] % p
        den[keep] = den[keep] * diff[keep, j] % p
    lam = np.array(
        [int(n) * pow(int(d), FIELD_PRIME - 2, FIELD_PRIME) for n, d in zip(num, den, strict=True)]
    )
    weights = (lam.astype(np.uint64) % p)[:, None]
    return ((weights * rows) % p).sum(axis=0, dtype=np.uint64) % p


# --- masks, quantisation and the graph ---


def expand_mask(seed: bytes, dim: int, bits: int) -> np.ndarray:
    """A `dim`-vector uniform mod 2^bits from a 32-byte seed (ChaCha20 keystream).

    Each seed is used once (pair seeds are bound to the round's public randomness), so the
    fixed nonce is safe. 32-bit words for ``bits <= 32`` halve the keystream.
    """
    word = 4 if bits <= 32 else 8
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    v = np.frombuffer(stream.update(bytes(dim * word)), f"<u{word}").astype(np.uint64)
    if bits < 64:
        v &= np.uint64((1 << bits) - 1)
    return v


@dataclass(frozen=True, kw_only=True)
class Quantizer:
    """Floats clipped to [-clip, clip] as integers whose sum over `clients` fits 2^bits.

    Each client's value becomes an integer in ``[0, levels]`` with ``levels =
    (2^bits - 1) // clients``, so n ≤ clients summands never wrap. The dequantised sum
    differs from the sum of the clipped floats by at most `max_error` per entry.

    Example:
        >>> q = Quantizer(clip=1.0, bits=24, clients=100)
        >>> total = q.quantize(np.array([0.5])) + q.quantize(np.array([-0.25]))
        >>> round(float(q.dequantize_sum(total, summands=2)[0]), 4)
        0.25
    """

    clip: float
    bits: int
    clients: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive number, got {self.clip}")
        if not 1 <= self.bits <= 53:  # sums stay exact in float64's 53-bit mantissa
            raise ValueError(f"bits must be in [1, 53] for quantisation, got {self.bits}")
        if self.clients < 1 or self.levels < 1:
            raise ValueError(
                f"bits={self.bits} leaves room for at most {2**self.bits - 1} summands "
                f"(2^bits - 1); clients={self.clients} is too many"
            )

    @property
    def levels(self) -> int:
        """The largest integer one client's entry can become."""
        return (2**self.bits - 1) // max(self.clients, 1)

    @property
    def scale(self) -> float:
        """Integer steps per unit of the float value."""
        return self.levels / (2 * self.clip)

    def quantize(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Deterministic rounding to nearest, or unbiased stochastic rounding given `rng`."""
        v = np.clip(np.asarray(x, dtype=np.float64), -self.clip, self.clip) + self.clip
        v *= self.scale
        q = np.floor(v + rng.random(v.shape)) if rng is not None else np.rint(v)
        return np.clip(q, 0, self.levels).astype(np.uint64)

    def dequantize_sum(self, total: np.ndarray, summands: int) -> np.ndarray:
        """The float sum from the integer sum of `summands` quantised vectors."""
        if not 0 <= summands <= self.clients:
            raise ValueError(f"summands must be in [0, {self.clients}], got {summands}")
        return np.asarray(total, dtype=np.float64) / self.scale - summands * self.clip

    def max_error(self, summands: int, *, stochastic: bool = False) -> float:
        """Bound on |dequantised sum − sum of clipped floats| per entry."""
        return summands * (1.0 if stochastic else 0.5) / self.scale


def neighbour_graph(
    ids: Iterable[int], *, degree: int | None, round_seed: bytes
) -> dict[int, tuple[int, ...]]:
    """Each client's neighbours: every party computes the same graph from the same seed.

    Sparse: the Harary ring H(degree, n) — each client joined to the ``degree / 2``
    nearest on either side — after ordering the ids by SHA-256(round_seed ‖ id), a
    permutation nobody picks. ``degree=None`` or ``degree >= n - 1``: the complete graph.
    """
    order = list(ids)
    if len(set(order)) != len(order):
        raise ValueError("client ids must be distinct")
    order.sort(key=lambda i: hashlib.sha256(round_seed + struct.pack("<I", i)).digest())
    n = len(order)
    if degree is None or degree >= n - 1:
        return {i: tuple(sorted(j for j in order if j != i)) for i in order}
    if degree < 2 or degree % 2:
        raise ValueError(f"a sparse degree must be even and >= 2 (or >= n - 1), got {degree}")
    half = degree // 2
    return {
        i: tuple(sorted(order[(p + o) % n] for o in range(-half, half + 1) if o))
        for p, i in enumerate(order)
    }


@dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """What every party of a round agrees on before it starts.

    Attributes:
        dim: Length of each client's vector.
        bits: Sums are mod 2^bits (1..64); leave room for the clients' sum (`Quantizer`).
        threshold: Shares needed to rebuild a secret, per neighbourhood.
        degree: Neighbours per client (even); None for all others (classic SecAgg).
        round_seed: 32 bytes of public randomness: the graph and the key derivations.
    """

    dim: int
    bits: int
    threshold: int
    round_seed: bytes
    degree: int | None = None

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if not 1 <= self.bits <= 64:
            raise ValueError(f"bits must be in [1, 64], got {self.bits}")
        if self.threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {self.threshold}")
        if self.degree is not None and self.degree < 1:
            raise ValueError(f"degree must be >= 1 or None, got {self.degree}")
        if len(self.round_seed) != 32:
            raise ValueError(f"round_seed must be 32 bytes, got {len(self.round_seed)}")

    @property
    def modulus_mask(self) -> np.uint64:
        """2^bits − 1, to reduce a uint64 vector mod 2^bits."""
        return np.uint64((1 << self.bits) - 1)


def _check_id(client_id: int) -> None:
    if not 0 <= client_id <= _MAX_ID:
        raise ValueError(f"client id must be in [0, {_MAX_ID}], got {client_id}")


def _kdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


def _share_key(own: X25519PrivateKey, peer: bytes, seed: bytes, sender: int, to: int) -> bytes:
    # one key per direction, so the fixed AES-GCM nonce never repeats under a key
    info = b"corral secagg share" + struct.pack("<II", sender, to)
    return _kdf(own.exchange(X25519PublicKey.from_public_bytes(peer)), seed, info)


def _pair_seed(own: X25519PrivateKey, peer: bytes, seed: bytes, a: int, b: int) -> bytes:
    info = b"corral secagg mask" + struct.pack("<II", min(a, b), max(a, b))
    return _kdf(own.exchange(X25519PublicKey.from_public_bytes(peer)), seed, info)


# --- messages: plain data, each to and from bytes (little-endian, length-prefixed) ---


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("message truncated")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def ids(self) -> tuple[int, ...]:
        n = self.u32()
        return tuple(struct.unpack(f"<{n}I", self.take(4 * n)))

    def blobs(self) -> dict[int, bytes]:
        return {self.u32(): self.take(self.u32()) for _ in range(self.u32())}


def _ids(ids: Sequence[int]) -> bytes:
    return struct.pack(f"<I{len(ids)}I", len(ids), *ids)


def _blobs(blobs: Mapping[int, bytes]) -> bytes:
    parts = [struct.pack("<I", len(blobs))]
    parts += [struct.pack("<II", k, len(v)) + v for k, v in blobs.items()]
    return b"".join(parts)


@dataclass(frozen=True)
class KeyAdvert:
    """Round 0, client → server: the client's two X25519 public keys."""

    client_id: int
    c_public: bytes
    s_public: bytes

    def to_bytes(self) -> bytes:
        return struct.pack("<I", self.client_id) + self.c_public + self.s_public

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAdvert:
        r = _Reader(data)
        return cls(r.u32(), r.take(32), r.take(32))


@dataclass(frozen=True)
class Roster:
    """Round 0, server → one client: who takes part, and its neighbours' keys."""

    participants: tuple[int, ...]
    adverts: tuple[KeyAdvert, ...]

    def to_bytes(self) -> bytes:
        return _ids(self.participants) + b"".join(a.to_bytes() for a in self.adverts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Roster:
        r = _Reader(data)
        ids = r.ids()
        rest = r.take(len(data) - r.pos)
        return cls(
            ids, tuple(KeyAdvert.from_bytes(rest[k : k + 68]) for k in range(0, len(rest), 68))
        )


@dataclass(frozen=True)
class EncryptedShares:
    """Round 1, client → server: one ciphertext per neighbour, keyed by recipient."""

    sender: int
    ciphertexts: Mapping[int, bytes]

    def to_bytes(self) -> bytes:
        return struct.pack("<I", self.sender) + _blobs(self.ciphertexts)

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShares:
        r = _Reader(data)
        return cls(r.u32(), r.blobs())


@dataclass(frozen=True)
class RoutedShares:
    """Round 1, server → one client: the ciphertexts addressed to it, keyed by sender."""

    recipient: int
    ciphertexts: Mapping[int, bytes]

    def to_bytes(self) -> bytes:
        return struct.pack("<I", self.recipient) + _blobs(self.ciphertexts)

    @classmethod
    def from_bytes(cls, data: bytes) -> RoutedShares:
        r = _Reader(data)
        return cls(r.u32(), r.blobs())


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, client → server: y mod 2^bits, bit-packed (``bits`` bits an entry)."""

    client_id: int
    bits: int
    vector: np.ndarray

    def to_bytes(self) -> bytes:
        w = _word_bits(self.bits)
        v = np.ascontiguousarray(self.vector, dtype=f">u{w // 8}").view(np.uint8)
        packed = np.packbits(np.unpackbits(v.reshape(-1, w // 8), axis=1)[:, w - self.bits :])
        return struct.pack("<IBI", self.client_id, self.bits, len(self.vector)) + packed.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        client_id, bits, dim = struct.unpack("<IBI", data[:9])
        w, raw = _word_bits(bits), np.frombuffer(data, np.uint8, offset=9)
        full = np.zeros((dim, w), np.uint8)
        full[:, w - bits :] = np.unpackbits(raw, count=dim * bits).reshape(dim, bits)
        vector = np.packbits(full, axis=1).view(f">u{w // 8}").ravel().astype(np.uint64)
        return cls(client_id, bits, vector)


def _word_bits(bits: int) -> int:
    return 32 if bits <= 32 else 64


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3, server → one client: which of its neighbours survived and which dropped."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return _ids(self.survivors) + _ids(self.dropped)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        r = _Reader(data)
        return cls(r.ids(), r.ids())


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3, client → server: shares of survivors' self-mask seeds, of dropped s keys."""

    client_id: int
    seed_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]

    def to_bytes(self) -> bytes:
        return (
            struct.pack("<I", self.client_id) + _blobs(self.seed_shares) + _blobs(self.key_shares)
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        r = _Reader(data)
        return cls(r.u32(), r.blobs(), r.blobs())


# --- the parties ---


class SecAggClient:
    """One client of one round; call its four steps in order, one message each.

    Example (a whole round: `SecAggServer`'s):
        >>> config = SecAggConfig(dim=4, bits=16, threshold=2, round_seed=bytes(32))
        >>> client = SecAggClient(3, config)
        >>> len(client.advertise_keys().to_bytes())  # its id and two X25519 public keys
        68
    """

    def __init__(
        self, client_id: int, config: SecAggConfig, *, randomness: Randomness = os.urandom
    ) -> None:
        _check_id(client_id)
        self.client_id, self.config, self._random = client_id, config, randomness
        self._c_key = X25519PrivateKey.from_private_bytes(randomness(32))
        self._s_key = X25519PrivateKey.from_private_bytes(randomness(32))
        self._self_seed = randomness(32)
        self._step = 0
        self._keys: dict[int, KeyAdvert] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # peer → (its b share, its s share)
        self._revealed: dict[int, str] = {}  # peer → "seed" or "key"

    def _advance(self, step: int, name: str) -> None:
        if self._step != step:
            raise SecAggError(f"client {self.client_id}: {name} called out of order")
        self._step = step + 1

    def advertise_keys(self) -> KeyAdvert:
        """Round 0: the public halves of the c and s key pairs."""
        self._advance(0, "advertise_keys")
        return KeyAdvert(self.client_id, _public(self._c_key), _public(self._s_key))

    def share_keys(self, roster: Roster) -> EncryptedShares:
        """Round 1: Shamir shares of b and of the s key, one ciphertext per neighbour."""
        self._advance(1, "share_keys")
        cfg, me = self.config, self.client_id
        graph = neighbour_graph(roster.participants, degree=cfg.degree, round_seed=cfg.round_seed)
        if me not in graph:
            raise SecAggError(f"client {me} is not in the roster it was sent")
        self._keys = {a.client_id: a for a in roster.adverts}
        if set(self._keys) != set(graph[me]):
            raise SecAggError(f"client {me}: the roster's keys are not its neighbours' keys")
        if len(graph[me]) < cfg.threshold:
            raise SecAggError(
                f"client {me} has {len(graph[me])} neighbours, fewer than threshold {cfg.threshold}"
            )
        secrets = np.concatenate(
            [secret_to_field(self._self_seed), secret_to_field(_private(self._s_key))]
        )
        shares = shamir_split(secrets, [j + 1 for j in graph[me]], cfg.threshold, self._random)
        out = {}
        for j, row in zip(graph[me], shares, strict=True):
            body = struct.pack("<II", me, j) + row.astype("<u4").tobytes()
            key = _share_key(self._c_key, self._keys[j].c_public, cfg.round_seed, me, j)
            out[j] = AESGCM(key).encrypt(bytes(12), body, cfg.round_seed)
        return EncryptedShares(me, out)

    def mask_input(self, x: np.ndarray, routed: RoutedShares) -> MaskedInput:
        """Round 2: y = x + PRG(b) ± PRG(s_ij) over the neighbours whose shares arrived."""
        self._advance(2, "mask_input")
        cfg, me = self.config, self.client_id
        v = np.asarray(x)
        if v.shape != (cfg.dim,) or v.dtype.kind not in "ui":
            raise ValueError(f"the input must be an integer vector of shape ({cfg.dim},)")
        if v.size and (int(v.min()) < 0 or int(v.max()) > int(cfg.modulus_mask)):
            raise ValueError(f"input entries must be in [0, 2^{cfg.bits})")
        for j, ct in routed.ciphertexts.items():
            if j not in self._keys:
                raise SecAggError(f"client {me} was sent a share from non-neighbour {j}")
            key = _share_key(self._c_key, self._keys[j].c_public, cfg.round_seed, j, me)
            try:
                body = AESGCM(key).decrypt(bytes(12), ct, cfg.round_seed)
            except InvalidTag as err:
                raise SecAggError(f"client {me}: the share from {j} does not decrypt") from err
            if struct.unpack("<II", body[:8]) != (j, me):
                raise SecAggError(f"client {me}: the share from {j} names other parties")
            self._held[j] = (body[8 : 8 + _SHARE_BYTES], body[8 + _SHARE_BYTES :])
        if len(self._held) < cfg.threshold:
            raise SecAggError(
                f"client {me} received shares from {len(self._held)} neighbours, fewer than "
                f"threshold {cfg.threshold}: masking would not hide its input"
            )
        y = v.astype(np.uint64) + expand_mask(self._self_seed, cfg.dim, cfg.bits)
        for j in self._held:
            m = expand_mask(
                _pair_seed(self._s_key, self._keys[j].s_public, cfg.round_seed, me, j),
                cfg.dim,
                cfg.bits,
            )
            y = np.add(y, m, out=y) if me < j else np.subtract(y, m, out=y)
        return MaskedInput(me, cfg.bits, y & cfg.modulus_mask)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3: b shares for survivors, s-key shares for dropped peers, never both.

        May be called again (a retry), but a peer once revealed one way is refused the other.
        """
        if self._step < 3:
            raise SecAggError(f"client {self.client_id}: unmask called out of order")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if self.client_id in dropped:
            raise SecAggError(f"client {self.client_id} refuses: it is alive but listed as dropped")
        wanted = {j: "seed" for j in survivors & self._held.keys()}
        wanted |= {j: "key" for j in dropped & self._held.keys()}
        both = survivors & dropped & self._held.keys()
        both |= {j for j, kind in wanted.items() if self._revealed.get(j, kind) != kind}
        if both:
            raise SecAggError(
                f"client {self.client_id} refuses to reveal both the self-mask and the key shares "
                f"of clients {sorted(both)}: together they would expose their inputs"
            )
        self._revealed.update(wanted)
        return UnmaskResponse(
            self.client_id,
            {j: self._held[j][0] for j, k in wanted.items() if k == "seed"},
            {j: self._held[j][1] for j, k in wanted.items() if k == "key"},
        )


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


class SecAggServer:
    """The server of one round: routes messages and removes the masks from the sum.

    Example (each call's messages would go over the network):
        >>> cfg = SecAggConfig(dim=3, bits=16, threshold=2, round_seed=bytes(32))
        >>> clients = {i: SecAggClient(i, cfg) for i in range(4)}
        >>> server = SecAggServer(cfg)
        >>> rosters = server.collect_keys([c.advertise_keys() for c in clients.values()])
        >>> routed = server.route_shares([clients[i].share_keys(rosters[i]) for i in clients])
        >>> x = {i: np.full(3, i + 1, dtype=np.uint64) for i in clients}
        >>> masked = [clients[i].mask_input(x[i], routed[i]) for i in (0, 1, 2)]  # 3 drops
        >>> requests = server.collect_masked(masked)
        >>> server.aggregate(clients[i].unmask(r) for i, r in requests.items()).tolist()
        [6, 6, 6]
    """

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self._step = 0
        self._keys: dict[int, KeyAdvert] = {}
        self._graph: dict[int, tuple[int, ...]] = {}
        self._shared: set[int] = set()
        self._masked: dict[int, np.ndarray] = {}

    def _advance(self, step: int, name: str) -> None:
        if self._step != step:
            raise SecAggError(f"server: {name} called out of order")
        self._step = step + 1

    @property
    def survivors(self) -> tuple[int, ...]:
        """The clients whose masked inputs arrived: those the sum covers."""
        return tuple(sorted(self._masked))

    def collect_keys(self, adverts: Iterable[KeyAdvert]) -> dict[int, Roster]:
        """Round 0: fix the participants and the graph; each client gets its neighbours' keys."""
        self._advance(0, "collect_keys")
        for a in adverts:
            _check_id(a.client_id)
            if a.client_id in self._keys:
                raise ValueError(f"client {a.client_id} advertised keys twice")
            self._keys[a.client_id] = a
        cfg, ids = self.config, tuple(sorted(self._keys))
        if len(ids) <= cfg.threshold:
            raise SecAggError(
                f"{len(ids)} clients advertised keys; threshold {cfg.threshold} needs at least "
                f"{cfg.threshold + 1}"
            )
        self._graph = neighbour_graph(ids, degree=cfg.degree, round_seed=cfg.round_seed)
        fewest = min(len(n) for n in self._graph.values())
        if fewest < cfg.threshold:
            raise ValueError(f"threshold {cfg.threshold} exceeds the degree {fewest} of the graph")
        return {i: Roster(ids, tuple(self._keys[j] for j in self._graph[i])) for i in ids}

    def route_shares(self, bundles: Iterable[EncryptedShares]) -> dict[int, RoutedShares]:
        """Round 1: forward each ciphertext to its recipient, among those who shared."""
        self._advance(1, "route_shares")
        inbox: dict[int, dict[int, bytes]] = {}
        for b in bundles:
            if b.sender not in self._graph or set(b.ciphertexts) != set(self._graph[b.sender]):
                raise ValueError(f"client {b.sender}'s shares are not addressed to its neighbours")
            self._shared.add(b.sender)
            for j, ct in b.ciphertexts.items():
                inbox.setdefault(j, {})[b.sender] = ct
        return {i: RoutedShares(i, inbox.get(i, {})) for i in sorted(self._shared)}

    def collect_masked(self, inputs: Iterable[MaskedInput]) -> dict[int, UnmaskRequest]:
        """Round 2: keep the masked vectors; ask each survivor about its neighbours.

        Raises:
            SecAggError: too few survivors to unmask, checked before anything is asked.
        """
        self._advance(2, "collect_masked")
        for m in inputs:
            if m.client_id not in self._shared or m.client_id in self._masked:
                raise ValueError(f"unexpected or repeated masked input from client {m.client_id}")
            if m.bits != self.config.bits or m.vector.shape != (self.config.dim,):
                raise ValueError(f"client {m.client_id}'s masked input has the wrong size")
            self._masked[m.client_id] = m.vector
        alive = set(self._masked)
        self._check_enough({i: alive for i in self._needed()}, alive, "sent masked inputs")
        return {
            i: UnmaskRequest(
                tuple(j for j in self._graph[i] if j in alive),
                tuple(j for j in self._graph[i] if j in self._shared and j not in alive),
            )
            for i in sorted(alive)
        }

    def _needed(self) -> list[int]:
        """Whose secret must be rebuilt: every survivor's b, and the s key of each dropped
        client with a surviving neighbour (its masks are in that neighbour's vector)."""
        alive = set(self._masked)
        dropped = sorted(self._shared - alive)
        return sorted(alive) + [j for j in dropped if set(self._graph[j]) & alive]

    def _check_enough(self, holders: Mapping[int, set[int]], alive: set[int], verb: str) -> None:
        t, short = self.config.threshold, []
        for i, have in holders.items():
            got = len(have & set(self._graph[i]))
            if got < t:
                short.append(f"client {i}: {got} of its {len(self._graph[i])} neighbours")
        if short or len(alive) < t:
            more = f"; and {len(short) - 3} more" if len(short) > 3 else ""
            raise SecAggError(
                f"secure aggregation cannot unmask: {len(alive)} of {len(self._keys)} clients "
                f"{verb}, and {len(short)} needed secrets have fewer than threshold {t} of their "
                f"neighbours left ({'; '.join(short[:3]) or 'too few overall'}{more}); "
                "nothing is revealed"
            )

    def aggregate(self, responses: Iterable[UnmaskResponse]) -> np.ndarray:
        """Round 3: rebuild the seeds, remove the masks, return Σ x_i mod 2^bits over survivors.

        Raises:
            SecAggError: fewer than threshold shares for some needed secret (no sum is
                returned), or shares that do not rebuild a client's advertised key.
        """
        self._advance(3, "aggregate")
        cfg = self.config
        seed_shares: dict[int, dict[int, bytes]] = {}
        key_shares: dict[int, dict[int, bytes]] = {}
        answered: set[int] = set()
        for r in responses:
            if r.client_id not in self._masked:
                raise ValueError(f"unmask response from client {r.client_id}, not a survivor")
            answered.add(r.client_id)
            for j, s in r.seed_shares.items():
                seed_shares.setdefault(j, {})[r.client_id] = s
            for j, s in r.key_shares.items():
                key_shares.setdefault(j, {})[r.client_id] = s
        alive = set(self._masked)
        needed = self._needed()
        holders = {i: set((seed_shares if i in alive else key_shares).get(i, {})) for i in needed}
        self._check_enough(holders, answered, "answered the unmask request")
        total = np.zeros(cfg.dim, np.uint64)
        for y in self._masked.values():
            total += y
        for i in needed:
            secret = self._rebuild((seed_shares if i in alive else key_shares)[i])
            if i in alive:
                total -= expand_mask(secret, cfg.dim, cfg.bits)
                continue
            s_key = X25519PrivateKey.from_private_bytes(secret)
            if _public(s_key) != self._keys[i].s_public:
                raise SecAggError(f"the shares of client {i}'s key do not rebuild its public key")
            for k in sorted(set(self._graph[i]) & alive):
                m = expand_mask(
                    _pair_seed(s_key, self._keys[k].s_public, cfg.round_seed, i, k),
                    cfg.dim,
                    cfg.bits,
                )
                total = np.subtract(total, m, out=total) if k < i else np.add(total, m, out=total)
        return total & cfg.modulus_mask

    def _rebuild(self, shares: Mapping[int, bytes]) -> bytes:
        chosen = sorted(shares)[: self.config.threshold]
        rows = np.stack([np.frombuffer(shares[j], "<u4").astype(np.uint64) for j in chosen])
        try:
            return field_to_secret(shamir_combine([j + 1 for j in chosen], rows))
        except ValueError as err:
            raise SecAggError(f"shares from clients {chosen} rebuild no secret") from err


# --- in-process simulation ---


@dataclass(frozen=True, kw_only=True)
class SecAggReport:
    """What one simulated round produced and cost.

    Attributes:
        total: Σ x_i mod 2^bits over `included`.
        included: The clients whose masked input reached the server.
        bytes_sent: round name → client → bytes it uploaded in that round.
        bytes_received: round name → client → bytes the server sent it for that round.
        client_seconds: round name → client → its compute time in that round.
        server_seconds: round name → the server's compute time in that round.
    """

    total: np.ndarray
    included: tuple[int, ...]
    bytes_sent: dict[str, dict[int, int]]
    bytes_received: dict[str, dict[int, int]]
    client_seconds: dict[str, dict[int, float]]
    server_seconds: dict[str, float]


def _seeded(seed: int, client_id: int) -> Randomness:
    key = hashlib.sha256(f"corral secagg simulation {seed} {client_id}".encode()).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return lambda n: stream.update(bytes(n))


def simulate_round(
    inputs: Mapping[int, np.ndarray],
    *,
    bits: int,
    threshold: int,
    degree: int | None = None,
    dropped_before_masking: Iterable[int] = (),
    dropped_after_masking: Iterable[int] = (),
    seed: int | None = None,
) -> SecAggReport:
    """Run one round among `inputs`' clients and a server in this process, over bytes.

    Every message goes through ``to_bytes``/``from_bytes``, so the byte counts are the
    wire's. Dropouts: ``dropped_before_masking`` clients share their keys and then vanish
    (their masks are in their neighbours' vectors; their inputs are not summed);
    ``dropped_after_masking`` clients send their masked input and vanish before unmasking
    (their inputs are summed, as in Bonawitz et al.).

    Args:
        seed: Makes the round reproducible: the public randomness and, for the simulation
            only, every client's secret randomness. None: fresh OS randomness.
    """
    if not inputs:
        raise ValueError("secure aggregation needs at least one client")
    before, after = set(dropped_before_masking), set(dropped_after_masking)
    if not (before | after) <= set(inputs) or before & after:
        raise ValueError("dropped clients must be distinct clients of the round")
    dims = {np.shape(v) for v in inputs.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"every input must be a 1-D vector of one length, got shapes {dims}")
    public = os.urandom(32) if seed is None else hashlib.sha256(f"round {seed}".encode()).digest()
    cfg = SecAggConfig(
        dim=next(iter(dims))[0], bits=bits, threshold=threshold, degree=degree, round_seed=public
    )
    sent: dict[str, dict[int, int]] = {r: {} for r in ROUNDS}
    got: dict[str, dict[int, int]] = {r: {} for r in ROUNDS}
    csec: dict[str, dict[int, float]] = {r: {} for r in ROUNDS}
    ssec: dict[str, float] = {}
    clients = {
        i: SecAggClient(i, cfg, randomness=os.urandom if seed is None else _seeded(seed, i))
        for i in inputs
    }

    def on_clients(name: str, ids: Iterable[int], step: Callable[[int], bytes]) -> list[bytes]:
        out = []
        for i in ids:
            start = time.perf_counter()
            out.append(step(i))
            csec[name][i] = time.perf_counter() - start
            sent[name][i] = len(out[-1])
        return out

    def on_server(name: str, work: Callable[[], dict[int, bytes]]) -> dict[int, bytes]:
        start = time.perf_counter()
        out = work()
        ssec[name] = time.perf_counter() - start
        for i, data in out.items():
            got[ROUNDS[ROUNDS.index(name) + 1]][i] = len(data)
        return out

    def framed(messages: Mapping[int, Roster | RoutedShares | UnmaskRequest]) -> dict[int, bytes]:
        return {i: m.to_bytes() for i, m in messages.items()}

    server = SecAggServer(cfg)
    adverts = on_clients("advertise", clients, lambda i: clients[i].advertise_keys().to_bytes())
    rosters = on_server(
        "advertise", lambda: framed(server.collect_keys(KeyAdvert.from_bytes(a) for a in adverts))
    )
    bundles = on_clients(
        "share", rosters, lambda i: clients[i].share_keys(Roster.from_bytes(rosters[i])).to_bytes()
    )
    routed = on_server(
        "share", lambda: framed(server.route_shares(EncryptedShares.from_bytes(b) for b in bundles))
    )
    masked = on_clients(
        "mask",
        [i for i in routed if i not in before],
        lambda i: (
            clients[i]
            .mask_input(np.asarray(inputs[i]), RoutedShares.from_bytes(routed[i]))
            .to_bytes()
        ),
    )
    requests = on_server(
        "mask", lambda: framed(server.collect_masked(MaskedInput.from_bytes(m) for m in masked))
    )
    responses = on_clients(
        "unmask",
        [i for i in requests if i not in after],
        lambda i: clients[i].unmask(UnmaskRequest.from_bytes(requests[i])).to_bytes(),
    )
    start = time.perf_counter()
    total = server.aggregate(UnmaskResponse.from_bytes(r) for r in responses)
    ssec["unmask"] = time.perf_counter() - start
    return SecAggReport(
        total=total,
        included=server.survivors,
        bytes_sent=sent,
        bytes_received=got,
        client_seconds=csec,
        server_seconds=ssec,
    )


def secure_sum(
    inputs: Mapping[int, np.ndarray],
    *,
    bits: int,
    threshold: int,
    degree: int | None = None,
    dropped_before_masking: Iterable[int] = (),
    dropped_after_masking: Iterable[int] = (),
    seed: int | None = None,
) -> np.ndarray:
    """The securely aggregated sum mod 2^bits, as `simulate_round` computes it."""
    return simulate_round(
        inputs,
        bits=bits,
        threshold=threshold,
        degree=degree,
        dropped_before_masking=dropped_before_masking,
        dropped_after_masking=dropped_after_masking,
        seed=seed,
    ).total
