"""In-memory transport: the same contract as the libp2p one, for unit tests and the simulator.

A :class:`MemoryNetwork` is a registry of :class:`MemoryTransport` objects by peer id. An exchange
calls the target's handler directly in the caller's task (after an optional simulated latency each
way) and counts bytes exactly as :class:`~p2pnode.transport.p2p.P2PTransport` would on the wire
(header + body per frame), so numbers from the simulator and from real runs are comparable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from p2pnode.errors import MessageRejected, PeerError, PeerUnreachable
from p2pnode.transport.base import Handler, Transport, TransportStats
from p2pnode.transport.calls import CallTracker, dispatch
from p2pnode.transport.framing import (
    STATUS_REJECTED,
    check_size,
    decode_reason,
    encode_reason,
    framed_size,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20


class MemoryNetwork:
    """Registry of in-memory transports, addressed by peer id."""

    def __init__(self) -> None:
        self._transports: dict[str, MemoryTransport] = {}

    @property
    def peer_ids(self) -> list[str]:
        """Peer ids of the transports currently registered (open)."""
        return list(self._transports)

    def register(self, transport: MemoryTransport) -> None:
        """Add ``transport``; raises ``ValueError`` if its peer id is taken."""
        if transport.peer_id in self._transports:
            raise ValueError(f"peer id {transport.peer_id!r} is already on this network")
        self._transports[transport.peer_id] = transport

    def unregister(self, peer_id: str) -> None:
        """Remove the transport with ``peer_id`` (no-op if absent)."""
        self._transports.pop(peer_id, None)

    def lookup(self, peer_id: str) -> MemoryTransport | None:
        """The open transport with ``peer_id``, or ``None``."""
        return self._transports.get(peer_id)


class MemoryTransport(Transport):
    """A :class:`Transport` whose peers live in the same event loop.

    Parameters
    ----------
    network
        The network to join; the transport registers itself on construction.
    peer_id
        This transport's id on ``network`` (any unique string).
    max_message_bytes
        Largest request or reply accepted (and sent).
    latency_s
        Simulated one-way delay, applied to the request and to the reply.
    """

    def __init__(self, network: MemoryNetwork, peer_id: str, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, latency_s: float = 0.0) -> None:
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self.stats = TransportStats()
        self.max_message_bytes = max_message_bytes
        self.latency_s = latency_s
        self._network = network
        self._peer_id = peer_id
        self._handler: Handler | None = None
        self._calls = CallTracker()
        network.register(self)

    @property
    def peer_id(self) -> str:
        return self._peer_id

    async def start(self, handler: Handler) -> None:
        self._calls.check_open()
        if self._handler is not None:
            raise RuntimeError("MemoryTransport.start() called twice")
        self._handler = handler

    async def exchange(self, peer_id: str, request: bytes, *, timeout: float,
                       maddrs: Sequence[str] = ()) -> bytes:
        with self._calls.track():
            self.stats.calls_out += 1
            try:
                async with asyncio.timeout(timeout):
                    return await self._roundtrip(peer_id, request)
            except TimeoutError:
                self.stats.failures_out += 1
                raise PeerUnreachable(f"no reply within {timeout:g} s", peer=peer_id) from None
            except PeerError:
                self.stats.failures_out += 1
                raise

    async def close(self) -> None:
        self._calls.close()
        self._network.unregister(self._peer_id)

    async def _roundtrip(self, peer_id: str, request: bytes) -> bytes:
        check_size(len(request), self.max_message_bytes, what="request", peer=peer_id)
        target = self._network.lookup(peer_id)
        if target is None:
            raise PeerUnreachable("no such peer on the network (unknown or closed)", peer=peer_id)
        await self._delay()
        self.stats.bytes_sent += framed_size(len(request))
        status, body = await target._serve(self._peer_id, request)
        await self._delay()
        self.stats.bytes_received += framed_size(len(body))
        if status == STATUS_REJECTED:
            raise MessageRejected(f"peer rejected the request: {decode_reason(body)}", peer=peer_id)
        check_size(len(body), self.max_message_bytes, what="reply", peer=peer_id)
        return body

    async def _serve(self, sender: str, request: bytes) -> tuple[int, bytes]:
        """Server side of one exchange; returns the ``(status, body)`` frame sent back."""
        if self._handler is None or self._calls.closed:
            raise PeerUnreachable("peer is not serving", peer=self._peer_id)
        self.stats.calls_in += 1
        self.stats.bytes_received += framed_size(len(request))
        status, body = await self._dispatch(sender, request)
        self.stats.bytes_sent += framed_size(len(body))
        return status, body

    async def _dispatch(self, sender: str, request: bytes) -> tuple[int, bytes]:
        assert self._handler is not None
        if self.screen is not None and (refused := self.screen(sender, len(request))) is not None:
            self.stats.rejected_in += 1
            return STATUS_REJECTED, encode_reason(refused)
        if len(request) > self.max_message_bytes:
            self.stats.rejected_in += 1
            self.stats.frames_rejected += 1
            reason = f"request of {len(request)} bytes exceeds max_message_bytes={self.max_message_bytes}"
            return STATUS_REJECTED, encode_reason(reason)
        return await dispatch(self._handler, sender, request, max_message_bytes=self.max_message_bytes,
                              stats=self.stats)

    async def _delay(self) -> None:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
