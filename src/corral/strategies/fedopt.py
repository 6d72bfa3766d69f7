"""FedOpt: the server treats the clients' mean update as a gradient for its own optimizer.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2. With Δ the
round's aggregate update (the negative of a pseudo-gradient), the server keeps a first
moment m ← β₁m + (1 − β₁)Δ and a second moment v, and moves the global weights by
η·m / (√v + τ). The three variants differ only in v:

- `FedAdagrad`: v ← v + Δ²
- `FedYogi`:    v ← v − (1 − β₂)·Δ²·sign(v − Δ²)   (grows v slowly: Zaheer et al. 2018)
- `FedAdam`:    v ← β₂v + (1 − β₂)·Δ²

v starts at τ² as in the paper, so the first steps are bounded by η. Moments are the
server's state: checkpointed, so a restarted job continues them.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from corral.strategies.fedavg import FedAvg

if TYPE_CHECKING:
    import torch


class FedOpt(FedAvg):
    """FedAvg with an adaptive server optimizer; use `FedAdam`, `FedYogi` or `FedAdagrad`.

    Attributes:
        server_lr: η, the server's learning rate (the paper tunes it per task, 10⁻³ to 1).
        beta1: β₁ of the first moment.
        beta2: β₂ of the second moment (not used by FedAdagrad).
        tau: τ, the adaptivity: larger is closer to plain momentum.
    """

    server_lr: float = Field(default=0.01, gt=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)

    def server_step(
        self, state: dict[str, torch.Tensor], start_vec: torch.Tensor, aggregate: torch.Tensor
    ) -> torch.Tensor:
        import torch

        if not state:
            state["m"] = torch.zeros_like(start_vec)
            state["v"] = torch.full_like(start_vec, self.tau**2)
        m, v = state["m"], state["v"]
        m.mul_(self.beta1).add_(aggregate, alpha=1 - self.beta1)
        self.second_moment(v, aggregate * aggregate)
        return start_vec + self.server_lr * m / (v.sqrt() + self.tau)

    @abstractmethod
    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        """Update `v` in place from the aggregate's square."""


class FedAdagrad(FedOpt):
    """FedOpt with Adagrad's second moment: the sum of squares."""

    kind: Literal["fedadagrad"] = "fedadagrad"  # type: ignore[assignment]

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        v.add_(squared)


class FedYogi(FedOpt):
    """FedOpt with Yogi's second moment: additive, sign-controlled."""

    kind: Literal["fedyogi"] = "fedyogi"  # type: ignore[assignment]

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        v.sub_((1 - self.beta2) * squared * (v - squared).sign())


class FedAdam(FedOpt):
    """FedOpt with Adam's second moment: an exponential average of squares."""

    kind: Literal["fedadam"] = "fedadam"  # type: ignore[assignment]

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(squared, alpha=1 - self.beta2)
