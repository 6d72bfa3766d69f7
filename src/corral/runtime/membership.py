"""Who trains which epoch: epoch-end meetings, joining successors, leaving and lost workers.

A job whose workers share no process group (one that a dead peer would break) still has
to agree at every epoch's end: on the sum of the epoch's metrics, and on who trains the
next epoch. `Membership` is that agreement as pure decisions: its host (a parameter
server, or any process every worker can reach) feeds it the requests as they arrive and
sends the `Reply`s it returns; nothing here touches a socket, so the protocol is tested
without processes.

* A worker announces its share of an epoch (`begin_epoch`); if it dies, `lost` says what
  it left undone, from the steps the host saw it complete.
* At the epoch's end every member brings its sums to a meeting (`meet`); the meeting
  answers once all members came, with the total and the members of the next epoch.
* Within an epoch, members may also sum something among themselves (`gather`: a
  strategy's exact model average, say); such a sum waits for the current members only
  and admits nobody.
* A successor started in a lost worker's place is expected (`lost(..., successor)`); the
  next meeting waits until it asked to `join`, and admits it there, so it trains from
  the next epoch on. Once every member left, waiting joiners are told the job is over.

Two hosts run it: a parameter server's shard 0 (whose consistency model must admit a
joiner in the same step as the meeting), and, for any other strategy that trains on
without a lost worker, the driver (`corral.runtime.meetings`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

#: Whom a reply goes to: whatever the host uses to answer a request (a ZeroMQ identity).
To = TypeVar("To", bound=Hashable)


@dataclass(frozen=True)
class Reply(Generic[To]):
    """Send `header` and `arrays` to `to`, who has been waiting for it."""

    to: To
    header: dict[str, Any]
    arrays: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Decision(Generic[To]):
    """What the host does after one event: answer `replies`, and start counting the
    `admitted` workers as training (the joiners a meeting let in)."""

    replies: list[Reply[To]] = field(default_factory=list)
    admitted: list[int] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Share:
    """A worker's share of one epoch, and the host's step count when it began."""

    epoch: int
    steps: int
    samples: int
    clock: int


@dataclass
class _Meeting(Generic[To]):
    """One epoch-end sum in progress: the running total, who added to it, who waits."""

    total: np.ndarray
    came: set[int] = field(default_factory=set)
    waiting: list[To] = field(default_factory=list)

    def add(self, to: To, worker: int, values: np.ndarray) -> None:
        """`worker` adds `values` (once: a resent copy is not added again), and waits."""
        if worker not in self.came:
            self.total += values
            self.came.add(worker)
        self.waiting.append(to)


class Membership(Generic[To]):
    """The members of a running job and its epoch-end meetings.

    Example:
        >>> m = Membership[str](range(2))
        >>> m.meet("a", worker=0, epoch=1, sums=np.ones(1)).replies
        []
        >>> [r.to for r in m.meet("b", worker=1, epoch=1, sums=np.ones(1)).replies]
        ['a', 'b']
    """

    def __init__(self, members: Iterable[int]) -> None:
        self.members = set(members)
        self._meetings: dict[int, _Meeting[To]] = {}
        self._sums: dict[str, _Meeting[To]] = {}
        self._joiners: list[tuple[To, int]] = []
        self._expected: set[int] = set()  # successors started but not yet come to join
        self._shares: dict[int, Share] = {}
        self._left_any = False  # once every member left, the job is over

    def add(self, worker: int) -> None:
        """Count `worker` as a member: its host found it training (a restarted host
        learns the members back from their requests)."""
        self.members.add(worker)

    def begin_epoch(self, worker: int, share: Share) -> None:
        """`worker` starts `share`; kept so a loss can be accounted for."""
        self._shares[worker] = share

    def meet(self, to: To, *, worker: int, epoch: int, sums: np.ndarray) -> Decision[To]:
        """`worker` adds `sums` to `epoch`'s meeting and waits there (a resent copy of its
        sums is not added twice)."""
        self._meetings.setdefault(epoch, _Meeting(np.zeros_like(sums))).add(to, worker, sums)
        return self._release()

    def gather(self, to: To, *, worker: int, key: str, values: np.ndarray) -> Decision[To]:
        """`worker` adds `values` to the sum named `key` over the current members; all
        who added are answered with the total and their ranks once every member did (a
        resent copy is not added twice)."""
        self._sums.setdefault(key, _Meeting(np.zeros_like(values))).add(to, worker, values)
        return self._release()

    def join(self, to: To, *, worker: int) -> Decision[To]:
        """`worker` asks to join; it is answered when the next meeting is."""
        self._joiners.append((to, worker))
        return self._release()  # a meeting may have waited for this successor

    def leave(self, worker: int, *, clock: int) -> tuple[dict[str, int], Decision[To]]:
        """`worker` is done (or dead) after `clock` steps: stop waiting for it.

        Returns what it had done of its last epoch (``{}`` if it began none), and the
        decision its absence makes possible.
        """
        share = self._shares.pop(worker, None)
        done = {}
        if share is not None and worker in self.members:
            done = {
                "epoch": share.epoch,
                "steps": share.steps,
                "samples": share.samples,
                "steps_done": clock - share.clock,
            }
        self.members.discard(worker)
        self._expected.discard(worker)
        self._left_any = True
        return done, self._release()

    def lost(
        self, worker: int, *, successor: int | None, clock: int
    ) -> tuple[dict[str, int], Decision[To]]:
        """`worker` died after `clock` steps; `successor`, if any, was started in its
        place, and the next meeting waits for it to join."""
        if successor is not None:
            self._expected.add(successor)
        return self.leave(worker, clock=clock)

    def _release(self) -> Decision[To]:
        """Answer every meeting all members came to (joiners become members there), and
        once every member left, tell waiting joiners the job is over."""
        replies: list[Reply[To]] = []
        admitted: list[int] = []
        for key in [k for k, sum_ in self._sums.items() if self.members <= sum_.came]:
            sum_ = self._sums.pop(key)
            came = sorted(sum_.came)
            replies += [Reply(to, {"members": came}, (sum_.total,)) for to in sum_.waiting]
        for epoch in sorted(self._meetings):
            meeting = self._meetings[epoch]
            joining = {worker for _, worker in self._joiners}
            if not (self.members <= meeting.came and self._expected <= joining):
                continue
            del self._meetings[epoch]
            for _, worker in self._joiners:
                self.members.add(worker)
                admitted.append(worker)
            self._expected -= joining
            members = sorted(self.members)
            replies += [Reply(to, {"members": members}, (meeting.total,)) for to in meeting.waiting]
            replies += [
                Reply(to, {"epoch": epoch + 1, "members": members}) for to, _ in self._joiners
            ]
            self._joiners = []
        if self._left_any and not self.members:
            replies += [Reply(to, {"finished": True}) for to, _ in self._joiners]
            self._joiners = []
        return Decision(replies=replies, admitted=admitted)


def untrained(done: dict[str, int]) -> dict[str, int]:
    """A lost worker's account for the caller, from what `leave` returned: the epoch it
    died in (1-based), its steps done of its share, and the samples it left untrained."""
    if not done:
        return {}  # it had not started an epoch
    steps, samples, steps_done = done["steps"], done["samples"], done["steps_done"]
    base, extra = divmod(samples, steps)  # batches are near-equal, larger ones first
    trained = steps_done * base + min(steps_done, extra)
    return {
        "epoch": done["epoch"] + 1,
        "steps_done": steps_done,
        "steps": steps,
        "samples_not_trained": samples - trained,
    }
