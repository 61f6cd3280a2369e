"""The simulator's virtual clock and its link and compute model; nothing here ever sleeps.

Model (documented in ``p2pnode simulate --help``):

- A link between nodes a and b has a one-way latency ``L * f`` and a bandwidth ``B * g`` (bytes per
  second), where f and g are drawn once per link, uniformly in ``[1 - jitter, 1 + jitter]``, from a hash
  of (seed, a, b): the same on both directions and on every run with that seed.
- One exchange (a request of q bytes, a reply of p bytes, both counted as framed on the wire) costs
  ``2 * latency + (q + p) / bandwidth`` seconds of virtual time.
- A node's local training costs ``local_steps * step_s`` seconds of virtual time.
- A node's round takes its training time plus its slowest exchange (the exchanges of a round run
  concurrently); rounds are synchronous, so a round of the simulation takes as long as its slowest
  live node's round, and the clock then advances by that much.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class LinkModel:
    """Per-link latency and bandwidth (module docstring).

    Attributes
    ----------
    latency_s
        Mean one-way latency of a link, seconds.
    bandwidth_bps
        Mean bandwidth of a link, bytes per second.
    jitter
        Each link's latency and bandwidth are scaled by factors uniform in ``[1 - jitter, 1 + jitter]``;
        ``0 <= jitter < 1``.
    seed
        Seeds the per-link factors.
    """

    latency_s: float = 0.02
    bandwidth_bps: float = 12.5e6
    jitter: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError(f"latency must be >= 0, got {self.latency_s}")
        if self.bandwidth_bps <= 0:
            raise ValueError(f"bandwidth must be > 0, got {self.bandwidth_bps}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def _factors(self, a: int, b: int) -> tuple[float, float]:
        if self.jitter == 0:
            return 1.0, 1.0
        lo, hi = min(a, b), max(a, b)
        digest = hashlib.blake2b(f"{self.seed}/{lo}/{hi}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest[:4], "little") / 2**32
        v = int.from_bytes(digest[4:], "little") / 2**32
        return 1.0 + self.jitter * (2 * u - 1), 1.0 + self.jitter * (2 * v - 1)

    def link(self, a: int, b: int) -> tuple[float, float]:
        """``(one-way latency in s, bandwidth in bytes/s)`` of the link between nodes a and b."""
        f, g = self._factors(a, b)
        return self.latency_s * f, self.bandwidth_bps * g

    def exchange_s(self, a: int, b: int, request_bytes: int, reply_bytes: int) -> float:
        """Virtual seconds one exchange between a and b takes: two latencies plus the bytes' transfer."""
        latency, bandwidth = self.link(a, b)
        return 2 * latency + (request_bytes + reply_bytes) / bandwidth


@dataclass(slots=True)
class VirtualClock:
    """Virtual time of a simulation, advanced one synchronous round at a time (module docstring).

    During a round, :meth:`note_exchange` records each exchange's cost against the node that made it;
    :meth:`end_round` turns them, with each node's compute time, into the round's duration.
    """

    links: LinkModel = field(default_factory=LinkModel)
    step_s: float = 0.005
    now: float = 0.0
    rounds: list[float] = field(default_factory=list)  # duration of each finished round
    _slowest: dict[int, float] = field(default_factory=dict)  # node -> its slowest exchange this round
    exchanges: int = 0
    exchange_time: float = 0.0  # sum of all exchange costs

    def __post_init__(self) -> None:
        if self.step_s < 0:
            raise ValueError(f"step time must be >= 0, got {self.step_s}")

    def __call__(self) -> float:
        """The current virtual time (so the clock can stand in for ``time.monotonic``)."""
        return self.now

    def begin_round(self) -> None:
        self._slowest.clear()

    def note_exchange(self, a: int, b: int, request_bytes: int, reply_bytes: int) -> float:
        """Record an exchange that node a made with node b; returns its cost in virtual seconds."""
        cost = self.links.exchange_s(a, b, request_bytes, reply_bytes)
        if cost > self._slowest.get(a, 0.0):
            self._slowest[a] = cost
        self.exchanges += 1
        self.exchange_time += cost
        return cost

    def slowest_exchange(self, node: int) -> float:
        return self._slowest.get(node, 0.0)

    def node_round_s(self, node: int, steps: int) -> float:
        """Node's round this round: ``steps`` of compute plus its slowest exchange."""
        return steps * self.step_s + self.slowest_exchange(node)

    def end_round(self, steps: dict[int, int]) -> float:
        """Close the round (``steps[i]``: local steps of live node i); advance by the slowest; return it."""
        duration = max((self.node_round_s(i, s) for i, s in steps.items()), default=0.0)
        self.rounds.append(duration)
        self.now += duration
        return duration
