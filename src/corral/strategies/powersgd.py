"""PowerSGD's state through a checkpoint, by parameter, so a resumed job trains on exactly.

PowerSGD (Vogels et al., NeurIPS 2019) keeps two things between steps: the error
feedback (what the low-rank step left out, added back next step; each rank its own) and
the warm-started Q factors; it also counts steps for its warm-up. torch keeps them per
DDP *bucket*, as flat buffers in the bucket's order of parameters. That order is not the
same in a new `DistributedDataParallel`: its first step uses the parameters' order and
later steps the order in which gradients became ready (DDP rebuilds its buckets after
the first step). Flat buffers restored as they were land on the wrong parameters, which
measured worse than restoring nothing. So `PowerSGD` records each bucket's parameters as
the hook sees them, saves the buffers cut by parameter name, and puts them back in the
order of the bucket that asks for them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.futures import Future

#: A bucket's buffers cut by parameter name: ``{"errors": {name: …}, "q": {name: …}}``.
Cut = dict[str, dict[str, torch.Tensor]]


class PowerSGD:
    """torch's PowerSGD hook on `ddp`, with a state that survives a checkpoint.

    `state_dict` is collective (every rank's error feedback is its own, and the writer
    saves them all); `load_state_dict` keeps what it is given until each bucket's first
    compressed step, when the bucket's order is known.
    """

    def __init__(
        self, ddp: torch.nn.parallel.DistributedDataParallel, *, rank: int, warmup: int
    ) -> None:
        self.state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=warmup,
            min_compression_rate=1,
        )
        self.names = {id(p): name for name, p in ddp.module.named_parameters()}
        self.params = dict(ddp.module.named_parameters())
        self.order: dict[int, list[str]] = {}  # bucket index → its parameters, as last seen
        self.pending: Cut | None = None  # restored, until the buckets ask for it
        # DDP checks a hook's annotations against the real classes, and this module's are
        # strings (postponed evaluation): register an unannotated lambda
        ddp.register_comm_hook(self.state, lambda state, bucket: self._hook(state, bucket))

    def _hook(
        self, state: powerSGD_hook.PowerSGDState, bucket: dist.GradBucket
    ) -> Future[torch.Tensor]:
        index = bucket.index()
        names = [self.names[id(p)] for p in bucket.parameters()]
        before = self.order.get(index)
        if self.pending is not None and state.iter >= state.start_powerSGD_iter:
            self._join(index, names, self.pending, bucket.buffer())
        elif before is not None and before != names:  # DDP rebuilt its buckets
            self._join(index, names, self._cut(index, before), bucket.buffer())
        self.order[index] = names
        return powerSGD_hook.powerSGD_hook(state, bucket)

    def _compressed(self, names: list[str]) -> list[tuple[str, int, int]]:
        """The parameters PowerSGD compresses in a bucket, with their P and Q sizes, in the
        order its buffers hold them (grouped by matrix shape, as torch's hook groups them:
        a parameter is an n × m matrix there, approximated at rank r)."""
        groups: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
        rank, rate = self.state.matrix_approximation_rank, self.state.min_compression_rate
        for name in names:
            p = self.params[name]
            n = p.shape[0]
            m = p.numel() // n
            r = min(n, m, rank)
            if powerSGD_hook._should_compress(n, m, r, rate)[0]:
                groups.setdefault((n, m), []).append((name, n * r, m * r))
        return [entry for group in groups.values() for entry in group]

    def _cut(self, index: int, names: list[str]) -> Cut:
        """Bucket `index`'s buffers, held in the order `names`, cut by parameter."""
        state = self.state
        cut: Cut = {"errors": {}, "q": {}}
        if index in state.error_dict:
            sizes = [self.params[n].numel() for n in names]
            parts = state.error_dict[index].detach().cpu().split(sizes)
            cut["errors"] = dict(zip(names, parts, strict=True))
        if index in state.q_memory_dict:
            compressed = self._compressed(names)
            parts = state.q_memory_dict[index].detach().cpu().split([q for *_, q in compressed])
            cut["q"] = dict(zip([n for n, *_ in compressed], parts, strict=True))
        return cut

    def _join(self, index: int, names: list[str], cut: Cut, like: torch.Tensor) -> None:
        """Set bucket `index`'s buffers from `cut`, in the order `names` (taking what it
        uses out of `cut`); a bucket `cut` does not cover starts afresh."""
        state, errors, qs = self.state, cut["errors"], cut["q"]
        if all(n in errors for n in names):
            state.error_dict[index] = torch.cat([errors.pop(n) for n in names]).to(like)
        compressed = self._compressed(names)
        if compressed and all(n in qs for n, *_ in compressed):
            state.q_memory_dict[index] = torch.cat([qs.pop(n) for n, *_ in compressed]).to(like)
            # P is recomputed from Q each step, but its buffer must exist, or the hook
            # draws a random Q instead of warm-starting from this one
            state.p_memory_dict[index] = like.new_empty(sum(p for _, p, _ in compressed))
        if cut is self.pending and not errors and not qs:
            self.pending = None

    def state_dict(self) -> dict[str, Any]:
        """Every rank's state cut by parameter, gathered from all ranks (collective)."""
        errors: dict[str, torch.Tensor] = {}
        qs: dict[str, torch.Tensor] = {}
        for index, names in self.order.items():
            cut = self._cut(index, names)
            errors |= cut["errors"]
            qs |= cut["q"]
        mine = {"errors": errors, "q": qs, "iter": self.state.iter}
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        return {"ranks": every}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take this rank's part of `saved`; a checkpoint of another world size does not
        map onto this one's ranks, and is left out."""
        ranks = saved.get("ranks", [])
        if len(ranks) != dist.get_world_size():
            return
        mine = ranks[dist.get_rank()]
        self.state.iter = mine["iter"]
        self.pending = {"errors": dict(mine["errors"]), "q": dict(mine["q"])}
