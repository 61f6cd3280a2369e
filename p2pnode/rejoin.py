"""Merge the DHT again after a network partition heals.

hivemind's DHT drops a peer from its routing table the first time a request to it goes unanswered
(``DHTProtocol.update_routing_table(responded=False)``) and keeps it out of its searches with an
exponential backoff (5 s, 10 s, 20 s, …); nothing in hivemind ever looks for a dropped peer again. During a
partition every node soon sends some request to each peer of the other side, so the two sides end up
with disjoint routing tables: once the network heals their libp2p connections come back, but stores
and gets stay inside each side and the membership views never merge again. Measured with
``p2pnode bench partition`` (8 nodes, 4+4, ~2 minutes cut): no view had grown back after 4 minutes.

:class:`Rejoiner` remembers which peers were in the view. Every ``every``-th heartbeat it asks the DHT
process to ping up to ``batch`` peers that are missing from the view and were last seen within
``forget_s``. A peer that answers is back in the routing table (hivemind adds every peer that answers a
ping, on both ends, and hands it the records it should store) and off the search blacklist, so the next
store and get reach the other side again and its record is back in the view one heartbeat later.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)


async def ping_in_dht(dht: Any, node: Any, peers: list[str]) -> list[str]:
    """Runs inside the DHT process (``DHT.run_coroutine``): ping ``peers`` concurrently; the responders.

    A responder is cleared from the node's search blacklist; ``call_ping`` itself puts it back in the
    routing table (and asks it to add us to its own).
    """
    import asyncio

    from hivemind.p2p import PeerID

    ids = [PeerID.from_base58(p) for p in peers]
    replies = await asyncio.gather(*(node.protocol.call_ping(pid) for pid in ids), return_exceptions=True)
    answered = []
    for peer, pid, reply in zip(peers, ids, replies):
        if reply is None or isinstance(reply, BaseException):
            continue
        answered.append(peer)
        node.blacklist.register_success(pid)  # also resets its backoff
    return answered


class Rejoiner:
    """Which peers to ping so that a healed partition merges again (see the module docstring).

    Parameters
    ----------
    every:
        Ping on every ``every``-th call of :meth:`due` (one call per heartbeat).
    batch:
        Most peers pinged at once (drawn at random from the missing ones).
    forget_s:
        A peer last seen longer ago than this is not pinged any more (it left for good).
    max_peers:
        Most peers remembered (the least recently seen are forgotten first).
    clock, rng:
        Injectable for tests.
    """

    def __init__(self, *, every: int = 2, batch: int = 8, forget_s: float = 600.0, max_peers: int = 1024,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        if every < 1 or batch < 1 or forget_s <= 0 or max_peers < 1:
            raise ValueError(f"need every >= 1, batch >= 1, forget_s > 0, max_peers >= 1; got {every}, "
                             f"{batch}, {forget_s}, {max_peers}")
        self.every, self.batch, self.forget_s, self.max_peers = every, batch, forget_s, max_peers
        self.clock, self.rng = clock, rng or random.Random()
        self.answered = 0  # pings answered, over this object's life
        self._seen: OrderedDict[str, float] = OrderedDict()  # peer id -> last time in the view (LRU)
        self._calls = 0

    def due(self, view: Iterable[str]) -> list[str]:
        """Note the peers of the current ``view``; return those to ping now (empty when not due)."""
        now = self.clock()
        present = set(view)
        for peer in present:
            self._seen.pop(peer, None)
            self._seen[peer] = now
        while len(self._seen) > self.max_peers:
            self._seen.popitem(last=False)
        while self._seen and now - next(iter(self._seen.values())) > self.forget_s:
            self._seen.popitem(last=False)
        self._calls += 1
        if self._calls % self.every:
            return []
        missing = [peer for peer in self._seen if peer not in present]
        return self.rng.sample(missing, min(self.batch, len(missing)))

    def note_answered(self, answered: list[str], asked: int) -> None:
        """Count the peers that answered a ping of :meth:`due`'s list (logged when some did)."""
        if answered:
            self.answered += len(answered)
            logger.info("rejoin: %d of %d peers missing from the view answered a DHT ping", len(answered),
                        asked)
