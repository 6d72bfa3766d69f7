"""The settings of secure aggregation, apart from the protocol (`corral.federated.secagg`),
so that a job spec reads them without loading numpy or the cryptography package."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SecureAggregation(BaseModel):
    """Settings of secure aggregation for a federated strategy.

    Each client's update is clipped per coordinate to ``[-clip, clip]`` and quantised
    (stochastic rounding) into integers whose sum over the round's clients fits
    ``2^bits``; the server learns only that sum. Clients weigh the same: a sample count
    the client reports itself is something the server could not check.

    Attributes:
        clip: The range of one coordinate of a client's update.
        bits: Width of the sums (the quantisation step is 2·clip·n / 2^bits).
        degree: Neighbours per client: None for SecAgg+'s sparse graph of about
            4·log2(n) neighbours, ``"all"`` for classic SecAgg (every pair).
        threshold: The fraction of a client's neighbours needed to remove its masks.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip: float = Field(default=1.0, gt=0)
    bits: int = Field(default=32, ge=8, le=53)
    degree: int | Literal["all"] | None = None
    threshold: float = Field(default=0.5, gt=0, le=1)

    def graph(self, clients: int) -> tuple[int | None, int]:
        """The degree (None: complete graph) and threshold for a round of `clients`."""
        if self.degree == "all":
            degree = None
        elif self.degree is None:
            degree = 2 * math.ceil(2 * math.log2(max(clients, 2)))  # even, ≈ 4·log2(n)
        else:
            degree = self.degree
        if degree is not None and degree >= clients - 1:
            degree = None
        neighbours = clients - 1 if degree is None else degree
        return degree, max(1, math.ceil(self.threshold * neighbours))
