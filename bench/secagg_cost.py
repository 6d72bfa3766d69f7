"""Claim: secure aggregation's cost next to plain aggregation, and SecAgg+'s saving at scale.

Runs `corral.federated.secagg.simulate_round` — every client and the server in this
process, every message through its bytes — for 100 and 500 clients, 0% and 30% dropouts,
and model vectors of d = 650 (the digits example's 64→10 softmax model) and d = 100,000.
SecAgg+ (Bell et al., CCS 2020) uses k = ``--c``·log2(n) neighbours, rounded up to even;
classic SecAgg (Bonawitz et al., CCS 2017, complete graph, threshold n/2 + 1) runs at 100
clients for comparison. The dropouts leave after sharing their keys and before masking,
the server's costly case (it rebuilds their keys and re-expands their pair masks).

Inputs are 16-bit quantised floats (`Quantizer`); the sum is mod 2^(16 + ⌈log2 n⌉). Plain
aggregation is the baseline: each client sends its 16-bit vector in the clear and the
server adds them up. Prints, per configuration, the server's and the mean client's
compute per round (summed over the four rounds, measured apart), the bytes each
surviving client sends and receives, and the upload expansion over the plain 16-bit
vector; then the expansion of this wire format in Bonawitz et al.'s own setting (2^10
clients, 2^20 16-bit entries, computed from the message framing), beside the 1.73× the
paper reports for that setting.

Run: ``.venv/bin/python bench/secagg_cost.py`` (``--help`` for sizes; ~1-2 min on 2 cores).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import numpy as np

from corral.federated.secagg import (
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    Quantizer,
    Roster,
    RoutedShares,
    UnmaskRequest,
    UnmaskResponse,
    simulate_round,
)

_CIPHERTEXT = 8 + 2 * 36 + 16  # two ids, two 9-element shares, the AES-GCM tag
_SHARE = 36


def sparse_params(n: int, c: float, dropout: float) -> tuple[int, int]:
    """k = c·log2(n) rounded up to even; t the largest threshold whose chance that some
    neighbourhood keeps fewer than t of k at the design dropout rate is ≤ 1e-3 (union bound).
    """
    k = 2 * math.ceil(c * math.log2(n) / 2)

    def short(t: int) -> float:  # n · P[Binomial(k, 1 - dropout) < t]
        q = 1 - dropout
        return n * sum(math.comb(k, x) * q**x * (1 - q) ** (k - x) for x in range(t))

    return k, max(t for t in range(1, k + 1) if short(t) <= 1e-3)


def run(n: int, dim: int, dropout: float, degree: int | None, threshold: int) -> dict[str, float]:
    room = math.ceil(math.log2(n))
    bits = 16 + room
    quantizer = Quantizer(clip=1.0, bits=bits, clients=2**room)  # levels 2^16 - 1
    rng = np.random.default_rng(n + dim)
    inputs = {i: quantizer.quantize(rng.normal(0, 0.3, dim), rng) for i in range(n)}
    assert max(int(v.max()) for v in inputs.values()) < 2**16  # 16-bit entries
    dropped = {int(i) for i in rng.choice(n, round(dropout * n), replace=False)}
    report = simulate_round(
        inputs,
        bits=bits,
        threshold=threshold,
        degree=degree,
        dropped_before_masking=dropped,
        seed=n * dim,
    )
    # plain aggregation: the server adds the survivors' vectors as they arrive
    start = time.perf_counter()
    plain = np.zeros(dim, np.uint64)
    for i in report.included:
        plain += inputs[i]
    plain_s = time.perf_counter() - start
    assert np.array_equal(report.total, plain % np.uint64(2**bits)), "wrong sum"
    survivors = report.included
    up = np.mean(
        [sum(report.bytes_sent[r].get(i, 0) for r in report.bytes_sent) for i in survivors]
    )
    down = np.mean(
        [sum(report.bytes_received[r].get(i, 0) for r in report.bytes_received) for i in survivors]
    )
    client_s = np.mean(
        [
            sum(report.client_seconds[r].get(i, 0.0) for r in report.client_seconds)
            for i in survivors
        ]
    )
    return {
        "bits": bits,
        "server_s": sum(report.server_seconds.values()),
        "client_s": float(client_s),
        "plain_s": plain_s,
        "up": float(up),
        "down": float(down),
        "plain_bytes": dim * 2,
    }


def paper_setting(n: int = 2**10, dim: int = 2**20) -> tuple[float, float]:
    """Bytes of one classic-SecAgg client in Bonawitz et al.'s setting, from our framing,
    without running it: (upload, upload + download) over the 16-bit vector in the clear."""
    others = tuple(range(1, n))
    advert = KeyAdvert(0, bytes(32), bytes(32))
    ct = dict.fromkeys(others, bytes(_CIPHERTEXT))
    bits = 16 + math.ceil(math.log2(n))
    up = (
        len(advert.to_bytes())
        + len(EncryptedShares(0, ct).to_bytes())
        + len(MaskedInput(0, bits, np.zeros(dim, np.uint64)).to_bytes())
        + len(UnmaskResponse(0, dict.fromkeys(others, bytes(_SHARE)), {}).to_bytes())
    )
    down = (
        len(Roster((0, *others), (advert,) * len(others)).to_bytes())
        + len(RoutedShares(0, ct).to_bytes())
        + len(UnmaskRequest(others, ()).to_bytes())
    )
    plain = dim * 2
    return up / plain, (up + down) / plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--dims", type=int, nargs="+", default=[650, 100_000])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--c", type=float, default=4.0, help="SecAgg+ degree k = c·log2(n)")
    parser.add_argument("--classic-max", type=int, default=100, help="classic up to n clients")
    args = parser.parse_args()
    wall = time.monotonic()
    rows = []
    for n in args.clients:
        k, t_sparse = sparse_params(n, args.c, max(args.dropouts))
        graphs: list[tuple[str, int | None, int]] = [(f"SecAgg+ k={k}, t={t_sparse}", k, t_sparse)]
        if n <= args.classic_max:
            graphs.append((f"classic k={n - 1}, t={n // 2 + 1}", None, n // 2 + 1))
        for dim in args.dims:
            for dropout in args.dropouts:
                for name, degree, threshold in graphs:
                    r = run(n, dim, dropout, degree, threshold)
                    rows.append((n, dim, dropout, name, r))
                    print(f"done n={n} d={dim} drop={dropout} {name}", file=sys.stderr)
    load = os.getloadavg()
    print(
        f"\n{platform.node()}, {os.cpu_count()} CPUs, numpy {np.__version__}, Python "
        f"{sys.version.split()[0]}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"at the end; {time.monotonic() - wall:.0f} s in all\n"
    )
    print(
        "| n | d | dropouts | graph | bits | server s (plain s) | client s | "
        "client sends | client receives | upload / plain |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for n, dim, dropout, name, r in rows:
        print(
            f"| {n} | {dim:,} | {dropout:.0%} | {name} | {r['bits']:.0f} | "
            f"{r['server_s']:.3f} ({r['plain_s']:.5f}) | {r['client_s']:.4f} | "
            f"{kb(r['up'])} | {kb(r['down'])} | {r['up'] / r['plain_bytes']:.2f}× |"
        )
    up, both = paper_setting()
    print(
        f"\nBonawitz et al.'s setting (2^10 clients, 2^20 16-bit entries, classic, no "
        f"dropouts), this wire format: {up:.2f}× upload, {both:.2f}× upload + download, "
        f"over the 16-bit vector in the clear; the paper reports 1.73×."
    )


def kb(n: float) -> str:
    return f"{n / 1e3:,.1f} kB"


if __name__ == "__main__":
    main()
