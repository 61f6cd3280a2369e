"""Transports: request/reply exchanges with peers (see :mod:`p2pnode.transport.base`).

- :class:`MemoryTransport` on a :class:`MemoryNetwork`: in-process, for unit tests and the simulator.
- :class:`P2PTransport`: libp2p streams through hivemind's daemon, for real nodes. Imported on first
  use, so that in-process swarms and benchmarks (which need no libp2p) run where hivemind is absent.
"""

from typing import TYPE_CHECKING, Any

from p2pnode.transport.base import Handler, Transport, TransportStats
from p2pnode.transport.memory import MemoryNetwork, MemoryTransport

if TYPE_CHECKING:
    from p2pnode.transport.p2p import P2PTransport

__all__ = ["Handler", "MemoryNetwork", "MemoryTransport", "P2PTransport", "Transport", "TransportStats"]


def __getattr__(name: str) -> Any:
    if name == "P2PTransport":
        from p2pnode.transport.p2p import P2PTransport

        return P2PTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
