"""Secure aggregation (corral.federated.secagg): correct sums, hidden inputs, clear failures."""

from __future__ import annotations

import doctest
import hashlib
import itertools
import os
from collections.abc import Iterable

import numpy as np
import pytest

from corral.federated import secagg
from corral.federated.secagg import (
    FIELD_PRIME,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    Quantizer,
    Roster,
    RoutedShares,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    UnmaskRequest,
    UnmaskResponse,
    expand_mask,
    field_to_secret,
    neighbour_graph,
    secret_to_field,
    secure_sum,
    shamir_combine,
    shamir_split,
    simulate_round,
)

SEED = bytes(range(32))


def random_inputs(n: int, dim: int, bits: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 2**bits, dim, dtype=np.uint64) for i in range(n)}


def plain_sum(inputs: dict[int, np.ndarray], ids: Iterable[int], bits: int) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for i in ids:
        total += inputs[i]
    return total % np.uint64(2**bits)


Round = tuple[
    dict[int, SecAggClient], SecAggServer, dict[int, UnmaskRequest], dict[int, np.ndarray]
]


def until_unmasking(
    inputs: dict[int, np.ndarray],
    cfg: SecAggConfig,
    *,
    never_share: Iterable[int] = (),
    before: Iterable[int] = (),
) -> Round:
    """Drive the per-party classes by hand, as real clients would over a network, up to
    the unmask requests: (clients, server, requests, what the server holds per client)."""
    clients = {i: SecAggClient(i, cfg) for i in inputs}
    server = SecAggServer(cfg)
    rosters = server.collect_keys([c.advertise_keys() for c in clients.values()])
    bundles = [clients[i].share_keys(rosters[i]) for i in clients if i not in set(never_share)]
    routed = server.route_shares(bundles)
    masked = {
        i: clients[i].mask_input(inputs[i], routed[i]) for i in routed if i not in set(before)
    }
    requests = server.collect_masked(masked.values())
    return clients, server, requests, {i: m.vector for i, m in masked.items()}


def run_parties(
    inputs: dict[int, np.ndarray], cfg: SecAggConfig, **dropouts: Iterable[int]
) -> tuple[np.ndarray, dict[int, np.ndarray], SecAggServer]:
    """A whole round by hand: (the sum, what the server held per client, the server)."""
    clients, server, requests, masked = until_unmasking(inputs, cfg, **dropouts)
    total = server.aggregate(clients[i].unmask(r) for i, r in requests.items())
    return total, masked, server


@pytest.mark.parametrize("degree, threshold", [(None, 16), (8, 4)], ids=["classic", "secagg+"])
@pytest.mark.parametrize("dropouts", ["none", "after_masking", "before_masking", "both"])
def test_sum_equals_plain_sum(degree: int | None, threshold: int, dropouts: str) -> None:
    n, bits = 30, 20
    inputs = random_inputs(n, 300, bits)
    # 30% drop out: 9 clients, chosen at random with a fixed seed
    dropped = [int(i) for i in np.random.default_rng(7).choice(n, 9, replace=False)]
    before = {"before_masking": set(dropped), "both": set(dropped[:4])}.get(dropouts, set())
    after = {"after_masking": set(dropped), "both": set(dropped[4:])}.get(dropouts, set())
    report = simulate_round(
        inputs,
        bits=bits,
        threshold=threshold,
        degree=degree,
        dropped_before_masking=before,
        dropped_after_masking=after,
        seed=3,
    )
    # the sum covers every client whose masked input arrived, the after-masking ones too
    assert set(report.included) == set(range(n)) - before
    np.testing.assert_array_equal(report.total, plain_sum(inputs, report.included, bits))
    assert set(report.bytes_sent["mask"]) == set(report.included)
    assert all(v > 0 for v in report.bytes_sent["share"].values())


@pytest.mark.parametrize("stochastic", [False, True])
def test_quantised_floats_sum_within_the_stated_error(stochastic: bool) -> None:
    n, dim, clip = 24, 650, 1.0
    rng = np.random.default_rng(1)
    floats = {i: rng.normal(0, 0.5, dim) for i in range(n)}
    q = Quantizer(clip=clip, bits=24, clients=n)
    inputs = {i: q.quantize(x, rng if stochastic else None) for i, x in floats.items()}
    before = set(range(7))  # 30% dropped before masking
    total = secure_sum(
        inputs, bits=24, threshold=4, degree=10, dropped_before_masking=before, seed=0
    )
    survivors = [i for i in range(n) if i not in before]
    want = sum(np.clip(floats[i], -clip, clip) for i in survivors)
    got = q.dequantize_sum(total, summands=len(survivors))
    bound = q.max_error(len(survivors), stochastic=stochastic)
    assert np.abs(got - want).max() <= bound + 1e-9
    assert bound < 1e-3


def test_quantizer_refuses_a_modulus_without_room_for_the_clients() -> None:
    with pytest.raises(ValueError, match=r"at most 255 summands"):
        Quantizer(clip=1.0, bits=8, clients=256)
    q = Quantizer(clip=1.0, bits=8, clients=255)
    assert q.levels == 1
    with pytest.raises(ValueError, match="summands"):
        q.dequantize_sum(np.zeros(1, np.uint64), summands=256)


def chi_square_uniform(values: np.ndarray, bits: int, bins: int = 64) -> tuple[float, float]:
    """The chi-square statistic against uniform on [0, 2^bits) and its 0.1% critical value."""
    counts = np.bincount((values >> np.uint64(bits - 6)).astype(np.int64), minlength=bins)
    expected = len(values) / bins
    stat = float(((counts - expected) ** 2 / expected).sum())
    df, z = bins - 1, 3.0902  # Wilson–Hilferty for the upper 0.1% quantile
    critical = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    return stat, critical


def test_what_the_server_holds_for_a_client_looks_uniform() -> None:
    bits, dim, n = 16, 20_000, 8
    q = Quantizer(clip=1.0, bits=bits, clients=n)
    rng = np.random.default_rng(0)
    inputs = {i: q.quantize(rng.normal(0, 0.3, dim)) for i in range(n)}
    cfg = SecAggConfig(dim=dim, bits=bits, threshold=3, degree=4, round_seed=SEED)
    total, masked, _ = run_parties(inputs, cfg)
    np.testing.assert_array_equal(total, plain_sum(inputs, range(n), bits))
    stat, critical = chi_square_uniform(masked[0], bits)
    assert stat < critical, (stat, critical)
    # the same test fails on the input itself: it can tell
    stat, critical = chi_square_uniform(inputs[0], bits)
    assert stat > 100 * critical, (stat, critical)


def test_more_dropouts_than_the_threshold_fail_clearly_and_reveal_nothing() -> None:
    inputs = random_inputs(10, 50, 16)
    with pytest.raises(SecAggError, match=r"5 of 10 clients sent masked inputs.*threshold 6"):
        secure_sum(inputs, bits=16, threshold=6, dropped_before_masking=range(5), seed=0)
    # sparse: one neighbourhood short of shares at unmasking
    with pytest.raises(SecAggError, match=r"fewer than threshold 3.*nothing is revealed"):
        secure_sum(inputs, bits=16, threshold=3, degree=4, dropped_after_masking=range(6), seed=0)


def test_the_server_returns_no_partial_sum_when_too_few_answer() -> None:
    cfg = SecAggConfig(dim=20, bits=16, threshold=4, round_seed=SEED)
    clients, server, requests, _ = until_unmasking(random_inputs(6, 20, 16), cfg)
    answers = [clients[i].unmask(requests[i]) for i in (0, 1, 2)]
    with pytest.raises(SecAggError, match="3 of 6 clients answered"):
        server.aggregate(answers)
    with pytest.raises(SecAggError, match="out of order"):  # no second try on the same round
        server.aggregate(answers)


def test_a_client_refuses_to_reveal_both_shares_of_one_peer() -> None:
    cfg = SecAggConfig(dim=10, bits=16, threshold=3, round_seed=SEED)
    clients, *_ = until_unmasking(random_inputs(5, 10, 16), cfg)
    with pytest.raises(SecAggError, match=r"refuses to reveal both.*\[2\]"):
        clients[0].unmask(UnmaskRequest(survivors=(1, 2), dropped=(2,)))
    # nor across two requests: the self-mask share of 3 first, then its key share
    first = clients[0].unmask(UnmaskRequest(survivors=(1, 2, 3, 4), dropped=()))
    assert set(first.seed_shares) == {1, 2, 3, 4} and not first.key_shares
    with pytest.raises(SecAggError, match=r"refuses to reveal both.*\[3\]"):
        clients[0].unmask(UnmaskRequest(survivors=(1, 2, 4), dropped=(3,)))
    again = clients[0].unmask(UnmaskRequest(survivors=(1, 2, 3, 4), dropped=()))  # a retry
    assert again.seed_shares == first.seed_shares
    with pytest.raises(SecAggError, match="alive but listed as dropped"):
        clients[1].unmask(UnmaskRequest(survivors=(0, 2), dropped=(1,)))


def test_a_client_that_never_shares_is_left_out_of_everyones_masks() -> None:
    inputs = random_inputs(12, 40, 18)
    cfg = SecAggConfig(dim=40, bits=18, threshold=3, degree=6, round_seed=SEED)
    total, masked, server = run_parties(inputs, cfg, never_share=[5], before=[2, 9])
    assert set(masked) == set(range(12)) - {2, 5, 9} == set(server.survivors)
    np.testing.assert_array_equal(total, plain_sum(inputs, server.survivors, 18))


def test_forged_key_shares_are_caught() -> None:
    cfg = SecAggConfig(dim=10, bits=16, threshold=3, round_seed=SEED)
    clients, server, requests, _ = until_unmasking(random_inputs(6, 10, 16), cfg, before=[5])
    answers = [clients[i].unmask(r) for i, r in requests.items()]
    forged = {5: bytes(36)}
    answers = [UnmaskResponse(a.client_id, a.seed_shares, forged) for a in answers]
    with pytest.raises(SecAggError, match="client 5"):
        server.aggregate(answers)


def test_shamir_any_threshold_shares_rebuild_and_fewer_do_not() -> None:
    secret = os.urandom(32)
    elements = secret_to_field(secret)
    xs, t = list(range(1, 11)), 4
    shares = shamir_split(elements, xs, t)
    assert shares.shape == (10, 9) and int(shares.max()) < FIELD_PRIME
    for subset in itertools.islice(itertools.combinations(range(10), t), 0, None, 7):
        rebuilt = shamir_combine([xs[k] for k in subset], shares[list(subset)])
        assert field_to_secret(rebuilt) == secret
    for subset in itertools.combinations(range(10), t - 1):
        rebuilt = shamir_combine([xs[k] for k in subset], shares[list(subset)])
        assert not np.array_equal(rebuilt, elements)
    with pytest.raises(ValueError, match="distinct"):
        shamir_split(elements, [1, 1, 2], 2)
    with pytest.raises(ValueError, match="threshold"):
        shamir_split(elements, [1, 2], 3)
    with pytest.raises(ValueError, match="32 bytes"):
        secret_to_field(b"short")


def test_the_graph_is_the_same_for_every_party_given_the_seed() -> None:
    ids = list(range(100, 160))
    graph = neighbour_graph(ids, degree=8, round_seed=SEED)
    assert graph == neighbour_graph(reversed(ids), degree=8, round_seed=SEED)
    assert graph != neighbour_graph(ids, degree=8, round_seed=hashlib.sha256(SEED).digest())
    assert all(len(n) == 8 and i not in n for i, n in graph.items())
    assert all(i in graph[j] for i, n in graph.items() for j in n)  # symmetric
    full = neighbour_graph(ids[:5], degree=8, round_seed=SEED)
    assert full[100] == (101, 102, 103, 104)
    with pytest.raises(ValueError, match="even"):
        neighbour_graph(ids, degree=7, round_seed=SEED)


def test_messages_go_to_and_from_bytes() -> None:
    messages: list[KeyAdvert | Roster | EncryptedShares | RoutedShares | UnmaskRequest] = [
        KeyAdvert(3, os.urandom(32), os.urandom(32)),
        Roster((1, 3, 7), (KeyAdvert(1, bytes(32), bytes(range(32))),)),
        EncryptedShares(3, {1: b"abc", 7: b""}),
        RoutedShares(7, {3: os.urandom(96)}),
        UnmaskRequest((1, 2), (9,)),
    ]
    for m in messages:
        assert type(m).from_bytes(m.to_bytes()) == m
    response = UnmaskResponse(4, {1: bytes(36)}, {2: os.urandom(36)})
    assert UnmaskResponse.from_bytes(response.to_bytes()) == response
    for bits in (1, 7, 32, 64):
        v = expand_mask(os.urandom(32), 1001, bits)
        back = MaskedInput.from_bytes(MaskedInput(5, bits, v).to_bytes())
        assert back.client_id == 5 and back.bits == bits
        np.testing.assert_array_equal(back.vector, v)
        assert len(MaskedInput(5, bits, v).to_bytes()) == 9 + (1001 * bits + 7) // 8


def test_mask_expansion_is_seeded_and_in_range() -> None:
    seed = os.urandom(32)
    a = expand_mask(seed, 100_000, 20)
    np.testing.assert_array_equal(a, expand_mask(seed, 100_000, 20))
    assert a.dtype == np.uint64 and int(a.max()) < 2**20 and int(a.max()) > 2**19
    assert not np.array_equal(a, expand_mask(os.urandom(32), 100_000, 20))


def test_bad_sizes_and_ids_are_value_errors() -> None:
    with pytest.raises(ValueError, match="bits"):
        SecAggConfig(dim=4, bits=65, threshold=2, round_seed=SEED)
    with pytest.raises(ValueError, match="round_seed"):
        SecAggConfig(dim=4, bits=16, threshold=2, round_seed=b"x")
    with pytest.raises(ValueError, match="client id"):
        SecAggClient(-1, SecAggConfig(dim=4, bits=16, threshold=2, round_seed=SEED))
    with pytest.raises(ValueError, match="one length"):
        secure_sum({0: np.zeros(3, np.uint64), 1: np.zeros(4, np.uint64)}, bits=8, threshold=1)
    with pytest.raises(ValueError, match=r"\[0, 2\^8\)"):
        secure_sum({i: np.full(3, 256, np.uint64) for i in range(3)}, bits=8, threshold=1)
    with pytest.raises(ValueError, match="degree"):
        secure_sum(random_inputs(6, 3, 8), bits=8, threshold=3, degree=2)


def test_the_docstring_examples_hold() -> None:
    assert doctest.testmod(secagg, extraglobs={"np": np}).failed == 0
