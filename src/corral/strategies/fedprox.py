"""FedProx: FedAvg whose clients stay near the global model while they train.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020): each client
minimises its loss plus (μ/2)·‖w − wᵗ‖², wᵗ the round's global weights, which bounds how
far clients with unlike data (or more local epochs) drift apart. The term's gradient,
μ·(w − wᵗ), is added to the loss's before the local optimizer steps; μ = 0 is FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from corral.strategies.fedavg import FedAvg

if TYPE_CHECKING:
    import torch


class FedProx(FedAvg):
    """FedAvg with a proximal term of weight `mu` in every client's objective.

    Example:
        >>> corral.FedProx(clients=100, fraction=0.1, local_epochs=5, mu=0.01)

    Attributes:
        mu: μ, the proximal term's weight (the paper tries 0.001 to 1).
    """

    kind: Literal["fedprox"] = "fedprox"  # type: ignore[assignment]
    mu: float = Field(default=0.01, ge=0)

    def penalise(self, params: Sequence[torch.Tensor], start_vec: torch.Tensor) -> None:
        offset = 0
        for p in params:
            n = p.numel()
            if p.grad is not None:
                start = start_vec[offset : offset + n].view_as(p)
                p.grad.add_(p.detach() - start, alpha=self.mu)
            offset += n
