"""Membership for any strategy: train on without a lost worker, admit its successor.

A strategy whose workers share no process group can lose one without the others
noticing, but it must still meet at each epoch's end and learn who trains the next
epoch. Three pieces give it that, all on the driver's host (`corral.runtime.meetings`):

* its plan says ``membership=True`` (with the job's keys) and names `MembersSupervisor`,
  which reports a lost worker to the host and accounts for its undone share;
* its replica subclasses `MemberReplica`, which meets, joins and leaves through the host
  (``self.members``), and calls ``self.members.count_step()`` after each update so that a
  loss is accounted for step by step;
* ``self.members.gather`` sums anything over the current members mid-epoch (gossip's
  exact epoch-end average), and ``self.members.members()`` says who is still there.

The parameter server keeps its own host of the same `corral.runtime.membership`, on its
shard 0, because its consistency model must admit a joiner in the same step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral.strategies.base import Replica, Supervisor

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from corral.comm.curve import JobKeys
    from corral.runtime.meetings import MembershipClient


class MembersSupervisor(Supervisor):
    """Caller side: tells the driver's membership host about lost workers."""

    def __init__(self, keys: JobKeys) -> None:
        self.keys = keys

    def worker_lost(self, rank: int, successor: int | None, store: dist.Store) -> dict[str, Any]:
        from corral.runtime.meetings import ADDRESS_KEY, MembershipClient
        from corral.runtime.membership import untrained

        client = MembershipClient(store.get(ADDRESS_KEY).decode(), self.keys, worker=-1)
        try:
            return untrained(client.lost(rank, successor))
        finally:
            client.close()


class MemberReplica(Replica):
    """A replica that meets, joins and leaves through the driver's membership host.

    Subclasses set ``self.members`` (`MembershipClient.connect`) before training starts.
    """

    members: MembershipClient

    def begin_epoch(self, epoch: int, *, steps: int, samples: int) -> None:
        self.members.begin_epoch(epoch, steps=steps, samples=samples)

    def meet(self, epoch: int, sums: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        import torch

        totals, members = self.members.meet(epoch, sums.cpu().numpy())
        return torch.from_numpy(totals).to(sums.device), members

    def join(self) -> tuple[int, list[int]] | None:
        return self.members.join()

    def close(self) -> None:
        self.members.leave()
        self.members.close()
