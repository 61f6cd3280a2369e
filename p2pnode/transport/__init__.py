"""Transports: request/reply exchanges with peers (see :mod:`p2pnode.transport.base`).

- :class:`MemoryTransport` on a :class:`MemoryNetwork`: in-process, for unit tests and the simulator.
- :class:`P2PTransport`: libp2p streams through hivemind's daemon, for real nodes.
"""

from p2pnode.transport.base import Handler, Transport, TransportStats
from p2pnode.transport.memory import MemoryNetwork, MemoryTransport
from p2pnode.transport.p2p import P2PTransport

__all__ = ["Handler", "MemoryNetwork", "MemoryTransport", "P2PTransport", "Transport", "TransportStats"]
