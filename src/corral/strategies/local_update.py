"""One client's local training, shared by the simulation's workers and a real client.

A client starts from the round's global weights, trains ``local_epochs`` epochs of
mini-batches on its own samples with the job's optimizer (its state cleared: a client
carries no momentum of another's), lets the strategy change its gradients (FedProx's
proximal term) and returns the change it made, flattened: the update the aggregator sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from corral.strategies.base import Batch, LossFn, checked_loss

if TYPE_CHECKING:
    import numpy as np
    import torch

    from corral.strategies.fedavg import FedAvg


class LocalTraining:
    """The model, optimizer and loss one process trains its clients with, in turn."""

    def __init__(
        self,
        config: FedAvg,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossFn,
        *,
        rank: int = 0,
    ) -> None:
        self.config, self.model, self.optimizer, self.loss, self.rank = (
            config,
            model,
            optimizer,
            loss,
            rank,
        )
        self.params = [p for p in model.parameters() if p.requires_grad]

    def flat(self) -> torch.Tensor:
        """The trained parameters as one vector (a copy)."""
        import torch

        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def set_flat(self, vec: torch.Tensor) -> None:
        """Load `vec` (as `flat` returns it) into the parameters."""
        import torch

        if len(vec) != sum(p.numel() for p in self.params):
            raise ValueError(
                f"{len(vec)} weights for a model of {sum(p.numel() for p in self.params)}"
            )
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                p.copy_(vec[offset : offset + n].view_as(p))
                offset += n

    def update(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: np.ndarray,
        start_vec: torch.Tensor,
        *,
        order_seed: Sequence[int],
        batch_size: int,
        totals: Totals,
    ) -> torch.Tensor:
        """Train on rows `indices` of `x`, `y` from `start_vec`; returns the update.

        `order_seed` seeds the order of the samples in each local epoch (the simulation
        passes seed, round and client, so a client trains alike on any worker).
        """
        import numpy as np
        import torch

        self.set_flat(start_vec)
        self.optimizer.state.clear()
        order_rng = torch.Generator().manual_seed(
            int(np.random.SeedSequence(list(order_seed)).generate_state(1)[0])
        )
        own = torch.from_numpy(np.asarray(indices))
        epoch = int(order_seed[1]) if len(order_seed) > 1 else 0
        step = 0
        for _ in range(self.config.local_epochs):
            order = own[torch.randperm(len(own), generator=order_rng)]
            for lo in range(0, len(order), batch_size):
                rows = order[lo : lo + batch_size]
                xb, yb = x[rows], y[rows]
                out = self.model(xb)
                loss = self.loss(out, yb)
                value = checked_loss(loss, Batch(xb, yb, epoch, step), self.rank)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.config.penalise(self.params, start_vec)
                self.optimizer.step()
                totals.add(out.detach(), yb, value)
                step += 1
        return self.flat() - start_vec


class Totals:
    """Loss, correct and count of one worker's clients' local steps in a round."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.count, self.classification = 0.0, 0, 0, False

    def add(self, out: torch.Tensor, y: torch.Tensor, loss: float) -> None:
        self.loss_sum += loss * len(y)
        self.count += len(y)
        if not y.is_floating_point() and out.ndim == 2 and out.shape[1] > 1:
            self.classification = True
            self.correct += int((out.argmax(dim=1) == y).sum())
