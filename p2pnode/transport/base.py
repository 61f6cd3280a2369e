"""The transport contract: one request/reply exchange with a peer, with a deadline.

A :class:`Transport` moves opaque bytes. It does not sign, parse or trust them: the protocol layer
above (``protocols.envelope``) does. What the transport guarantees:

- ``exchange(peer, request, timeout=...)`` sends ``request`` to the peer's handler and returns the
  handler's reply, or raises before ``timeout`` seconds have passed.
- A message longer than ``max_message_bytes`` is refused *before* its body is allocated, on both
  sides (the sender gets :class:`~p2pnode.errors.MessageRejected`).
- Every byte that crosses this layer, in and out, payload and framing, is counted in ``stats``.

Errors (see :mod:`p2pnode.errors`): :class:`PeerUnreachable` (cannot connect, no answer before the
deadline, stream broke), :class:`MessageRejected` (the peer refused our request, or its reply broke the
framing or limits), :class:`TransportClosed` (we closed the transport). ``CancelledError`` propagates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

Handler = Callable[[str, bytes], Awaitable[bytes]]
"""Serves one request: ``(sender peer id as the transport authenticated it, request) -> reply``.

A handler rejects a request by raising :class:`p2pnode.errors.MessageRejected` (or
``protocols.errors.ProtocolError``); the transport then sends an error frame and the caller's
``exchange`` raises ``MessageRejected``. Any other exception is logged and reported the same way.
"""

Screen = Callable[[str, int], str | None]
"""Admits one incoming request before its body is read: ``(sender peer id, body length) -> None`` to
admit it, or the reason it is refused (sent back as the rejection; the handler never sees it).
"""


@dataclass(slots=True)
class TransportStats:
    """Counters kept by the transport itself (bytes include framing)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls_out: int = 0
    calls_in: int = 0
    failures_out: int = 0
    rejected_in: int = 0  # requests answered with a rejection, for any reason
    frames_rejected: int = 0  # of those, refused before the handler saw them (frame status or size)


class Transport(ABC):
    """Request/reply exchanges with peers identified by their libp2p peer id."""

    stats: TransportStats
    screen: Screen | None = None  # set by the owner (the node's PeerGuard), run on every request

    @property
    @abstractmethod
    def peer_id(self) -> str:
        """This node's peer id."""

    @abstractmethod
    async def start(self, handler: Handler) -> None:
        """Begin serving incoming exchanges with ``handler``. Call once."""

    @abstractmethod
    async def exchange(self, peer_id: str, request: bytes, *, timeout: float,
                       maddrs: Sequence[str] = ()) -> bytes:
        """Send ``request`` to ``peer_id`` and return its reply within ``timeout`` seconds.

        ``maddrs`` are addresses the peer announced (from its membership record); a transport may
        use them to dial a peer it has not met yet.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop serving; pending and later ``exchange`` calls raise ``TransportClosed``. Idempotent."""
