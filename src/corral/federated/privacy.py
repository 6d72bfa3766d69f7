"""Differential privacy for federated averaging: clip each client's update, add Gaussian noise.

This is DP-FedAvg, McMahan et al., "Learning Differentially Private Recurrent Language
Models" (ICLR 2018): every client's update is clipped to L2 norm at most ``clip`` (S), so
one client moves the sum of a round by at most S, and Gaussian noise of standard deviation
z·S (``noise_multiplier`` z) hides that move. The guarantee is *client-level*: it covers
everything one client contributes, not only one of its examples.

Two places may add the noise (`Privacy.mode`):

- ``central`` (the default): clients send their clipped updates, and the aggregator adds
  N(0, (z·S)²) once to their sum. The aggregator is trusted to see the individual updates
  (or, with secure aggregation, only their sum, which is all it needs).
- ``local``: each client adds N(0, (z·S)²) to its own clipped update before it leaves the
  client, so what the aggregator sees is already noised and need not be trusted. The sum
  then carries m times central DP's noise variance for m clients, and the guarantee is
  weaker for the same z (see `Accountant`): local DP costs much more accuracy.

The privacy loss is counted by `Accountant` with the Rényi-DP accountant of Google's
``dp-accounting`` package (Mironov, "Rényi Differential Privacy", CSF 2017; the sampled
Gaussian of Mironov, Talwar and Zhang, 2019). Each round is a Poisson-sampled Gaussian
mechanism with sampling rate q (the fraction of clients taking part) and noise multiplier z.

Example:
    >>> privacy = Privacy(clip=1.0, noise_multiplier=1.1, max_epsilon=8.0)
    >>> rng = np.random.default_rng(0)
    >>> update, _ = privatize_update(np.ones(4, np.float32), privacy, rng)
    >>> average = noised_average(update, expected_clients=10, privacy=privacy, rng=rng)
    >>> accountant = Accountant(privacy)
    >>> accountant.step(sample_rate=0.01, rounds=100)
    >>> round(accountant.epsilon(), 2)
    0.96
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from corral.errors import CorralError, SpecError

# numpy is imported where the math runs: the spec reads `Privacy` without it
if TYPE_CHECKING:
    import numpy as np

_INSTALL_HINT = "privacy accounting needs dp-accounting: pip install 'corral[federated]'"
#: Version of `Accountant.state_dict`'s layout, so a later layout can still read this one.
_STATE_VERSION = 1


class BudgetSpent(CorralError):
    """Another round would take the privacy loss past ``max_epsilon``; training must stop.

    Attributes:
        epsilon: The ε the accountant would report after `rounds` rounds.
        max_epsilon: The budget.
        delta: The δ at which ε is computed.
        rounds: The rounds the ε counts, the refused one included.
    """

    def __init__(self, *, epsilon: float, max_epsilon: float, delta: float, rounds: int) -> None:
        self.epsilon, self.max_epsilon = epsilon, max_epsilon
        self.delta, self.rounds = delta, rounds
        super().__init__(
            f"privacy budget spent: epsilon {_above(epsilon, max_epsilon)} > max_epsilon "
            f"{max_epsilon} (delta {delta:g}, {rounds} rounds)"
        )


def _above(epsilon: float, bound: float) -> str:
    """`epsilon` with enough decimals to read as greater than `bound` (8.004, not 8.00)."""
    for decimals in range(2, 7):
        text = f"{epsilon:.{decimals}f}"
        if float(text) > bound:
            return text
    return f"{epsilon:.6f}"


class Privacy(BaseModel):
    """How much each client's update is clipped and noised, and the budget it may spend.

    Attributes:
        clip: L2 norm bound S of one client's update (the flat vector of all its changes).
        noise_multiplier: z; the noise has standard deviation z·S, added once to the *sum*
            of the clipped updates (central) or to each (local). 0 adds no noise and gives
            no privacy (ε is infinite).
        delta: The δ at which ε is reported; keep it below 1 / (number of clients).
        max_epsilon: The budget: training stops (`BudgetSpent`) before a round that would
            take ε past it. ``None`` only reports ε.
        mode: Where the noise is added: ``central`` (once, by the aggregator, to the sum)
            or ``local`` (by every client, to its own update).

    Example:
        >>> Privacy(clip=0.5, noise_multiplier=1.0, max_epsilon=4.0, mode="local").noise_std
        0.5
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float = Field(ge=0, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(None, gt=0, allow_inf_nan=False)
    mode: Literal["central", "local"] = "central"

    @field_validator("max_epsilon")
    @classmethod
    def _budget_needs_noise(cls, value: float | None, info: ValidationInfo) -> float | None:
        """Refuse a budget no round can fit: without noise one round's ε is already infinite."""
        if value is not None and info.data.get("noise_multiplier") == 0:
            raise ValueError(
                "noise_multiplier 0 adds no noise, so epsilon is infinite and no round fits "
                "a budget: set noise_multiplier > 0, or max_epsilon to None"
            )
        return value

    @property
    def noise_std(self) -> float:
        """z·S: the standard deviation of the noise on the sum (central) or on each update
        (local)."""
        return self.noise_multiplier * self.clip


def clip(update: np.ndarray, norm: float) -> tuple[np.ndarray, bool]:
    """Scale `update` down to L2 norm `norm` if it is longer; leave it unchanged otherwise.

    Scaling the whole vector (not each coordinate) keeps its direction, and bounds what one
    client can move the sum by, which is what the noise is calibrated to.

    Args:
        update: A client's update, any shape; its norm is over all its elements.
        norm: The bound S, > 0.

    Returns:
        The clipped update (`update` itself when under the bound) and whether it was scaled;
        the strategy may report the fraction clipped to help choose S.

    Raises:
        ValueError: `norm` is not positive, or `update` holds NaN or infinity (its size
            cannot be bounded, and passing it on would break the guarantee).

    Example:
        >>> clip(np.array([3.0, 4.0]), 1.0)[0].round(6).tolist()
        [0.6, 0.8]
    """
    import numpy as np

    if not norm > 0:
        raise ValueError(f"norm must be > 0, got {norm}")
    length = float(np.linalg.norm(update.ravel()))
    if not math.isfinite(length):
        raise ValueError("the update holds NaN or infinity, so it cannot be clipped")
    if length <= norm:
        return update, False
    return (update * (norm / length)).astype(update.dtype, copy=False), True


def add_noise(vector: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """`vector` plus independent N(0, std²) noise on every element, in `vector`'s dtype.

    Args:
        vector: The clipped update or sum; a float32 vector gets float32 noise.
        std: The noise's standard deviation, ≥ 0 (0 returns a copy).
        rng: The source of randomness; pass a seeded one for reproducible runs, a fresh
            ``np.random.default_rng()`` (OS entropy) in production.

    Example:
        >>> add_noise(np.zeros(3), 0.0, np.random.default_rng(0)).tolist()
        [0.0, 0.0, 0.0]
    """
    import numpy as np

    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std}")
    dtype = np.float32 if vector.dtype == np.float32 else np.float64
    noise = rng.standard_normal(vector.shape, dtype=dtype)
    return (vector + dtype(std) * noise).astype(dtype, copy=False)


def privatize_update(
    update: np.ndarray, privacy: Privacy, rng: np.random.Generator
) -> tuple[np.ndarray, bool]:
    """What a client sends: its update clipped to S, and in local mode noised with z·S.

    Returns:
        The update to send and whether it was clipped.
    """
    clipped, was_clipped = clip(update, privacy.clip)
    if privacy.mode == "local":
        return add_noise(clipped, privacy.noise_std, rng), was_clipped
    return clipped, was_clipped


def noised_average(
    clipped_sum: np.ndarray, expected_clients: float, privacy: Privacy, rng: np.random.Generator
) -> np.ndarray:
    """The round's private average: (sum + noise) / `expected_clients`.

    The denominator is fixed at the *expected* number of clients per round, not the number
    that actually reported, as in DP-FedAvg: dividing by the actual count would make the
    denominator itself depend on whether a client took part, and the sensitivity of the
    average would no longer be a constant. With it fixed, one client moves the average by
    at most S / expected_clients, and the noise on the average is z·S / expected_clients.
    The average is an unbiased estimate of the sum's mean when clients are sampled
    independently with that expectation; a round where fewer report is shrunk toward 0.

    Args:
        clipped_sum: The sum of the round's updates from `privatize_update` (already noised
            by each client in local mode, clipped only in central mode).
        expected_clients: The expected number of clients per round, q·N, > 0.
        privacy: The settings; in central mode N(0, (z·S)²) is added to the sum here, in
            local mode nothing is (the clients did).
        rng: The aggregator's source of randomness.
    """
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    total = clipped_sum
    if privacy.mode == "central":
        total = add_noise(clipped_sum, privacy.noise_std, rng)
    return (total / expected_clients).astype(total.dtype, copy=False)


def _dp_accounting() -> Any:
    """The ``dp_accounting`` package, imported only when an `Accountant` is made: it is the
    ``federated`` extra, and the rest of this module works without it."""
    try:
        import dp_accounting
    except ImportError:
        raise SpecError(_INSTALL_HINT) from None
    return dp_accounting


@functools.lru_cache(maxsize=1024)
def _round_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """The RDP curve of one round, at the accountant's default orders.

    Composition in RDP is addition, so the accountant keeps only these curves and sums them
    with the counts; each distinct (q, z) costs dp-accounting's series once (tens of ms).
    """
    dp = _dp_accounting()
    event = dp.PoissonSampledDpEvent(sample_rate, dp.GaussianDpEvent(noise_multiplier))
    # for large q its series fails to converge at some orders, which it then leaves out
    # (a looser, still valid, bound) with one absl warning per order: dozens a job
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        curve: np.ndarray = dp.rdp.RdpAccountant().compose(event).rdp
    finally:
        absl.setLevel(level)
    curve.setflags(write=False)
    return curve


@functools.cache
def _orders() -> np.ndarray:
    """The RDP orders `_round_rdp`'s curves are at: the accountant's defaults."""
    orders: np.ndarray = _dp_accounting().rdp.RdpAccountant().orders
    return orders


class Accountant:
    """Counts the privacy loss of the rounds so far, as ε at the config's δ.

    Each round is accounted as the Poisson-sampled Gaussian mechanism with sampling rate
    q and noise multiplier z under add-or-remove-one-client adjacency: dp-accounting's
    ``RdpAccountant`` gives each distinct round's RDP curve, the curves add up over the
    rounds, and ``dp_accounting.rdp.compute_epsilon`` turns the total into ε at δ.

    DP-FedAvg samples each client independently with probability q, for which this is
    exact. Choosing exactly m of N clients without replacement is accounted as Poisson
    sampling with q = m/N: the usual approximation (Abadi et al., "Deep Learning with
    Differential Privacy", CCS 2016, account DP-SGD's shuffled batches so, as TensorFlow
    Privacy and Opacus do), but not an exact bound for fixed-size sampling, whose true ε
    can be larger (Lebeda et al., "Avoiding Pitfalls for Privacy Accounting of Subsampled
    Mechanisms under Composition", 2024).

    In local mode ε is the guarantee against the aggregator itself, which sees each
    client's message: local DP compares any two updates a client could send, whose
    clipped difference is up to 2S, so each round is a Gaussian mechanism with noise
    multiplier z/2, without amplification by sampling (the aggregator knows who took
    part), counted for every round as if the client took part in all. The released model
    is computed from those messages, so the same ε covers it. (Central mode's
    sampled-Gaussian bound does not carry over: there the noise on the sum does not
    depend on whether a client took part, in local mode it does.) Local rounds are kept
    in the ledger as what was accounted, (1.0, z/2, count).

    The rounds are kept as a ledger of (sample_rate, noise_multiplier, count), so a job
    restarted from `state_dict` continues with exactly the ε it had, even if q (or z)
    changed between rounds.

    Example:
        >>> accountant = Accountant(Privacy(clip=1.0, noise_multiplier=1.0, max_epsilon=3.5))
        >>> accountant.step(0.1, rounds=10)
        >>> round(accountant.epsilon(), 2), accountant.would_exceed(0.1)
        (3.44, True)
    """

    def __init__(self, privacy: Privacy) -> None:
        """Raises `SpecError` (with the pip command) when dp-accounting is not installed."""
        self._dp = _dp_accounting()
        self.privacy = privacy
        self._ledger: list[tuple[float, float, int]] = []

    @property
    def rounds(self) -> int:
        """The rounds accounted so far."""
        return sum(count for _, _, count in self._ledger)

    def step(self, sample_rate: float, rounds: int = 1) -> None:
        """Account for `rounds` rounds, each with a fraction `sample_rate` of the clients.

        Call it for every round whose result is released (the aggregate leaves the
        aggregator), with the config's current noise multiplier.
        """
        _check_rate(sample_rate)
        if not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
        if rounds:
            self._append(*self._accounted(sample_rate), rounds)

    def epsilon(self) -> float:
        """ε at the config's δ over the rounds so far; ``math.inf`` once a round had z == 0.

        z == 0 is no privacy: the update is released exactly, so no finite ε holds.
        """
        return self._epsilon(self._ledger)

    def would_exceed(self, sample_rate: float) -> bool:
        """Whether one more round at `sample_rate` would take ε past ``max_epsilon``.

        Always False without a budget. Ask before running the round, so that a refused
        round spends neither privacy nor compute.
        """
        return self._overspend(sample_rate) is not None

    def ensure_budget(self, sample_rate: float) -> None:
        """Raise `BudgetSpent` if one more round at `sample_rate` would exceed the budget."""
        over = self._overspend(sample_rate)
        if over is not None:
            epsilon, budget = over
            raise BudgetSpent(
                epsilon=epsilon,
                max_epsilon=budget,
                delta=self.privacy.delta,
                rounds=self.rounds + 1,
            )

    def state_dict(self) -> dict[str, Any]:
        """The ledger, as plain JSON-able data for a checkpoint."""
        ledger = [[q, z, count] for q, z, count in self._ledger]
        return {"version": _STATE_VERSION, "ledger": ledger}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the rounds accounted so far by those of `state` (from `state_dict`)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown accountant state version {state.get('version')!r}")
        self._ledger = []
        for q, z, count in state["ledger"]:
            _check_rate(q)
            if z < 0 or int(count) < 1:
                raise ValueError(f"bad accountant ledger entry {[q, z, count]!r}")
            self._append(float(q), float(z), int(count))

    def _append(self, sample_rate: float, noise_multiplier: float, count: int) -> None:
        """Add rounds, merged with the last entry when q and z match, so a resumed ledger
        is the same list as an uninterrupted one (and gives bit-identical ε)."""
        if self._ledger and self._ledger[-1][:2] == (sample_rate, noise_multiplier):
            count += self._ledger.pop()[2]
        self._ledger.append((sample_rate, noise_multiplier, count))

    def _overspend(self, sample_rate: float) -> tuple[float, float] | None:
        """(ε after one more round at `sample_rate`, the budget) if ε exceeds it, else None."""
        _check_rate(sample_rate)
        budget = self.privacy.max_epsilon
        if budget is None:
            return None
        epsilon = self._epsilon([*self._ledger, (*self._accounted(sample_rate), 1)])
        return (epsilon, budget) if epsilon > budget else None

    def _accounted(self, sample_rate: float) -> tuple[float, float]:
        """The (sampling rate, noise multiplier) a round is accounted with (see the class)."""
        if self.privacy.mode == "local":
            return 1.0, self.privacy.noise_multiplier / 2
        return float(sample_rate), self.privacy.noise_multiplier

    def _epsilon(self, ledger: list[tuple[float, float, int]]) -> float:
        """ε at δ of the rounds in `ledger`, by summing their RDP curves."""
        if not ledger:
            return 0.0
        if any(z == 0 for _, z, _ in ledger):
            return math.inf
        rdp = sum(count * _round_rdp(q, z) for q, z, count in ledger)
        epsilon, _ = self._dp.rdp.compute_epsilon(_orders(), rdp, self.privacy.delta)
        return float(epsilon)


def _check_rate(sample_rate: float) -> None:
    """Refuse a sampling rate outside (0, 1]: it is a fraction of the clients."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
