"""``--sync``: gossip of round-aligned models.

Free-running model gossip merges whatever the peers hold when they are asked: a peer's live model,
somewhere inside its own round of local steps, often a round or two behind or ahead of ours. On a busy
machine nodes drift rounds apart, and a merge then averages models of different ages (BENCHMARKS.md,
"Time and bytes to 0.80": 7 rounds to 0.80 against the all-reduce's 6).

With ``--sync`` a node keeps its model as it stood at the end of each round's local steps (before the
merge), for the last :data:`KEEP` rounds, and a peer's push for round ``r`` is answered with our model
of round ``r``: at once when we have it, or when we get there if we are behind (at most
``--timeout-exchange``; the asking node's straggler cutoff usually gives up sooner). At the merge only
pushes made in the same round count; a push from a round ahead waits in the inbox for that round, and
one from a round behind is dropped. So a round merges models of the same number of local steps, as an
all-reduce does, without a global barrier: each node waits only for the peers it sampled.

Limit: it suits a swarm whose nodes start together. A node that joins late or restarts keeps its own
round count; peers ahead of it answer with old snapshots (up to :data:`KEEP` rounds back) or their live
model, and drop its pushes as old, so it learns from them but its data stops reaching them. It does not
jump to its peers' round: rounds are self-reported, and a liar could end its run that way.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import torch

KEEP = 4  # rounds of own snapshots kept for peers that are behind


class RoundSnapshots:
    """This node's model at the end of each round's local steps (the last :data:`KEEP` rounds)."""

    def __init__(self) -> None:
        self._models: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._changed = asyncio.Event()
        self.closed = False  # no more rounds will come (the node finished its rounds)

    @property
    def latest(self) -> int:
        """The last round with a snapshot (0 before the first)."""
        return next(reversed(self._models), 0)

    def add(self, round: int, flat: torch.Tensor) -> None:
        self._models[round] = flat
        while len(self._models) > KEEP:
            self._models.popitem(last=False)
        self._wake()

    def close(self) -> None:
        """No round comes any more: wake every waiter (each then gets None for a round not reached)."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, round: int, timeout: float) -> torch.Tensor | None:
        """Our model of ``round``, waiting up to ``timeout`` s while we are behind it; None when that round
        is gone (older than :data:`KEEP` rounds) or not reached in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.latest < round and not self.closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return None
        return self._models.get(round)
