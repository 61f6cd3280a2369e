"""How long a round waits for the peers it sampled: every one of them, or up to a straggler cutoff.

A round pushes its model to k sampled peers and waits for their replies. A peer that is frozen, starved
or behind a bad link answers late or not at all, and waiting for it up to ``--timeout-exchange`` (30 s)
holds the whole round: every node that samples it loses that time, again each time it is sampled.

With a cutoff, once at least one peer has answered, the round stops waiting ``factor`` × the median of
the node's recent exchange times after it sent (never less than ``min_s``). The exchanges still running
go on in the background up to their own timeout; a reply that comes in later is handed to ``late`` (the
node puts it in its inbox, so it is merged next round, as a push would be) — nothing is thrown away.
Until the node has timed a few exchanges there is no cutoff: a fresh node has no idea what is normal.

The median and a floor keep it from firing on ordinary jitter: on loopback a dense exchange of the
fashion-mnist CNN takes ~0.1 s (``BENCHMARKS.md``), so a factor of 4 and a 1 s floor wait ten times that.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIN_SAMPLES = 4  # exchanges timed before a cutoff is used
HISTORY = 32  # exchange times the median is taken over


class StragglerCutoff:
    """The cutoff of one node: ``factor`` × the median of its last successful exchange times (>= ``min_s``).

    ``factor`` 0 turns it off (:meth:`cutoff` is then always None: wait for every peer).
    """

    def __init__(self, factor: float, min_s: float) -> None:
        self.factor, self.min_s = factor, min_s
        self._times: deque[float] = deque(maxlen=HISTORY)
        self.cut = 0  # exchanges a round stopped waiting for

    def record(self, seconds: float) -> None:
        """Note how long a successful exchange took."""
        self._times.append(seconds)

    def cutoff(self) -> float | None:
        """Seconds after sending that a round stops waiting (once one peer answered); None: no cutoff."""
        if self.factor <= 0 or len(self._times) < MIN_SAMPLES:
            return None
        return max(self.min_s, self.factor * statistics.median(self._times))


async def wait_for_replies(tasks: Mapping[str, asyncio.Future[T | None]], cutoff: float | None,
                           late: Callable[[str, T], None]) -> dict[str, T]:
    """Wait for ``tasks`` (peer id -> its exchange, resolving to its reply or None when it failed).

    Returns the replies in by the time every task is done, or, with ``cutoff``, by ``cutoff`` seconds from
    now once at least one reply is in. A task still running then is left to finish; ``late(peer, reply)``
    is called with its reply if it brings one. An unexpected exception in a task cancels the rest and is
    raised; so is cancellation of the caller.
    """
    loop = asyncio.get_running_loop()
    deadline = None if cutoff is None else loop.time() + cutoff
    pending = set(tasks.values())
    try:
        while pending:
            remaining = None
            if deadline is not None and any(t.done() and t.result() is not None for t in tasks.values()):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
            done, pending = await asyncio.wait(pending, timeout=remaining,
                                               return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # raise at once what a task raised
    except BaseException:
        for t in tasks.values():
            t.cancel()
        raise
    for peer, t in tasks.items():
        if not t.done():
            t.add_done_callback(_deliver_late(peer, late))
    return {peer: reply for peer, t in tasks.items() if t.done() and (reply := t.result()) is not None}


def _deliver_late(peer: str, late: Callable[[str, T], None]) -> Callable[[asyncio.Future[T | None]], None]:
    def done(task: asyncio.Future[T | None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("late exchange with %s failed: %r", peer, exc)
            return
        reply = task.result()
        if reply is not None:
            late(peer, reply)
    return done


async def timed(record: Callable[[float], None], work: Awaitable[T | None]) -> T | None:
    """Await ``work``; when it brings a result, ``record`` how long it took (seconds)."""
    start = asyncio.get_running_loop().time()
    result = await work
    if result is not None:
        record(asyncio.get_running_loop().time() - start)
    return result
