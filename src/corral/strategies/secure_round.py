"""A round's sum by secure aggregation, among simulated clients spread over the workers.

`corral.federated.secagg` holds the protocol (SecAgg, Bonawitz et al. CCS 2017; SecAgg+,
Bell et al. CCS 2020) as parties that exchange bytes. Here each worker plays the clients
it holds and every worker plays the same server: each of the protocol's four steps is one
``all_gather_object`` of the clients' messages, after which every worker runs the
server's (deterministic) step on the same messages in the same order. What the server
side of a worker ever sees of another worker's client is its masked, quantised vector;
the float sum of the survivors comes out of the last step.

Clients sampled for the round take part from the start; those that drop out (the
simulation's ``dropout``) vanish after sharing their keys, before masking, so their
masks must be removed with their neighbours' Shamir shares, as in the paper. A round with
more dropouts than a neighbourhood's threshold fails with `SecAggError` and no sum.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from corral.federated.secure import SecureAggregation


@dataclass(frozen=True)
class SecureSum:
    """What a secure round revealed: the survivors' float sum, who they are, and the bytes
    one client sent on average over the protocol's four steps."""

    total: np.ndarray
    included: tuple[int, ...]
    bytes_per_client: float


def secure_sum(
    settings: SecureAggregation,
    updates: dict[int, np.ndarray],
    *,
    mine: Sequence[int],
    sampled: Sequence[int],
    dropped: Iterable[int],
    seed: int,
    epoch: int,
) -> SecureSum:
    """The sum of every worker's `updates` (client → float update), securely aggregated.

    Args:
        updates: This worker's reporting clients' updates (clipped here).
        mine: Every client of the round this worker plays, dropped ones included.
        sampled: All clients of the round, on every worker the same.
        dropped: Clients that vanish after sharing their keys.
    """
    import numpy as np
    import torch.distributed as dist

    from corral.federated import secagg

    dim = len(next(iter(updates.values()))) if updates else 0
    dims = [0] * dist.get_world_size()
    dist.all_gather_object(dims, dim)
    dim = max(dims)
    degree, threshold = settings.graph(len(sampled))
    public = hashlib.sha256(f"corral secagg {seed} {epoch}".encode()).digest()
    config = secagg.SecAggConfig(
        dim=dim, bits=settings.bits, threshold=threshold, degree=degree, round_seed=public
    )
    quantizer = secagg.Quantizer(clip=settings.clip, bits=settings.bits, clients=len(sampled))
    ids = {c: c + 1 for c in sampled}  # the protocol's ids start at 1 (0 is Shamir's secret)
    clients = {c: secagg.SecAggClient(ids[c], config, randomness=os.urandom) for c in mine}
    server = secagg.SecAggServer(config)
    gone = set(dropped)
    sent = 0

    def everyone(messages: list[bytes]) -> list[bytes]:
        nonlocal sent
        sent += sum(len(m) for m in messages)
        parts: list[list[bytes]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, messages)
        return [m for part in parts for m in part]

    adverts = everyone([clients[c].advertise_keys().to_bytes() for c in mine])
    rosters = server.collect_keys(secagg.KeyAdvert.from_bytes(a) for a in adverts)
    bundles = everyone([clients[c].share_keys(rosters[ids[c]]).to_bytes() for c in mine])
    routed = server.route_shares(secagg.EncryptedShares.from_bytes(b) for b in bundles)
    masked = []
    for c in mine:
        if c in gone:
            continue
        rng = np.random.default_rng([seed, epoch, c, 3])
        q = quantizer.quantize(updates[c], rng)
        masked.append(clients[c].mask_input(q, routed[ids[c]]).to_bytes())
    requests = server.collect_masked(secagg.MaskedInput.from_bytes(m) for m in everyone(masked))
    answers = [clients[c].unmask(requests[ids[c]]).to_bytes() for c in mine if ids[c] in requests]
    total = server.aggregate(secagg.UnmaskResponse.from_bytes(r) for r in everyone(answers))
    included = server.survivors
    counts: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(counts, sent)
    total_sent = sum(counts)
    return SecureSum(
        total=quantizer.dequantize_sum(total, summands=len(included)).astype(np.float32),
        included=tuple(i - 1 for i in included),
        bytes_per_client=total_sent / max(len(sampled), 1),
    )
