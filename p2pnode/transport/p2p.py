"""Transport over hivemind's libp2p daemon, using binary *stream* handlers.

hivemind's unary RPC fails above 4 MiB, so each exchange opens one libp2p stream to the peer's
``protocol`` handler, writes one request frame and reads one reply frame (see
:mod:`p2pnode.transport.framing`). The remote peer id handed to the handler comes from the stream
info, which libp2p's secure channel (TLS / Noise) authenticated.

Library errors (hivemind's ``P2PDaemonError`` / ``P2PHandlerError``, ``OSError``,
``ConnectionError``, ``IncompleteReadError``, timeouts) are translated into
:mod:`p2pnode.errors` in one place, :func:`_translate_errors`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.utils.multiaddr import Multiaddr

from p2pnode.errors import MessageRejected, P2PNodeError, PeerError, PeerUnreachable
from p2pnode.transport.base import Handler, Transport, TransportStats
from p2pnode.transport.calls import CallTracker, dispatch
from p2pnode.transport.framing import (
    STATUS_OK,
    STATUS_REJECTED,
    Screened,
    check_size,
    decode_reason,
    encode_reason,
    read_frame,
    write_frame,
)

logger = logging.getLogger(__name__)

DEFAULT_PROTOCOL = "p2pnode.exchange.v1"
_LINGER_S = 2.0  # longest wait, after a reply, for the caller to hang up


@contextmanager
def _translate_errors(peer: str) -> Iterator[None]:
    """Translate library errors raised in the body into :mod:`p2pnode.errors` (the one place)."""
    try:
        yield
    except P2PNodeError:
        raise
    except P2PHandlerError as exc:
        raise MessageRejected(f"peer handler failed: {exc}", peer=peer) from exc
    except TimeoutError as exc:  # asyncio.TimeoutError is TimeoutError since Python 3.11
        raise PeerUnreachable("no connection or reply before the deadline", peer=peer) from exc
    except asyncio.IncompleteReadError as exc:
        raise PeerUnreachable(f"stream closed after {len(exc.partial)} of {exc.expected} bytes",
                              peer=peer) from exc
    except (P2PDaemonError, ConnectionError, OSError) as exc:
        raise PeerUnreachable(f"{type(exc).__name__}: {exc}", peer=peer) from exc


def _parse_peer_id(peer_id: str) -> PeerID:
    try:
        return PeerID.from_base58(peer_id)
    except ValueError as exc:
        raise PeerUnreachable(f"invalid peer id: {exc}", peer=peer_id) from exc


def _parse_maddrs(peer_id: str, maddrs: Sequence[str]) -> list[Multiaddr]:
    """Parse announced addresses, dropping a trailing ``/p2p/<id>`` (and addresses of other peers)."""
    return list(_parse_maddrs_cached(peer_id, tuple(maddrs)))


@functools.lru_cache(maxsize=4096)  # every exchange dials its peer's (rarely changing) addresses
def _parse_maddrs_cached(peer_id: str, maddrs: tuple[str, ...]) -> tuple[Multiaddr, ...]:
    parsed = []
    for text in maddrs:
        base, _, owner = text.partition("/p2p/")
        if owner and owner.split("/", 1)[0] != peer_id:
            logger.debug("ignoring address %s announced for %s: it names another peer", text, peer_id)
            continue
        try:
            parsed.append(Multiaddr(base))
        except Exception as exc:  # the multiaddr library raises several unrelated types
            raise PeerUnreachable(f"invalid multiaddr {text!r}: {exc}", peer=peer_id) from exc
    return tuple(parsed)


class P2PTransport(Transport):
    """A :class:`Transport` over a running ``hivemind.P2P`` instance (which the caller owns).

    Parameters
    ----------
    p2p
        A started ``hivemind.P2P``; :meth:`close` does not shut it down.
    max_message_bytes
        Largest request or reply accepted (checked from the frame header, before reading the body)
        and sent.
    chunk_bytes
        Size of the chunks a body is written and read in.
    connect_timeout
        Deadline for dialing the peer and opening the stream (within the exchange's own deadline).
    serve_timeout
        Deadline for serving one incoming stream: reading the request, running the handler,
        writing the reply.
    protocol
        libp2p protocol id of the stream handler; peers must use the same one.
    """

    def __init__(self, p2p: P2P, *, max_message_bytes: int, chunk_bytes: int = 1 << 20,
                 connect_timeout: float = 5.0, serve_timeout: float = 30.0,
                 protocol: str = DEFAULT_PROTOCOL) -> None:
        for name, value in (("max_message_bytes", max_message_bytes), ("chunk_bytes", chunk_bytes),
                            ("connect_timeout", connect_timeout), ("serve_timeout", serve_timeout)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.stats = TransportStats()
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = chunk_bytes
        self.connect_timeout = connect_timeout
        self.serve_timeout = serve_timeout
        self.protocol = protocol
        self._p2p = p2p
        self._peer_id = p2p.peer_id.to_base58()
        self._handler: Handler | None = None
        self._calls = CallTracker()
        self._serving = CallTracker()

    @property
    def peer_id(self) -> str:
        return self._peer_id

    async def start(self, handler: Handler) -> None:
        """Register the stream handler with the local daemon.

        Errors of the *local* daemon (``P2PDaemonError``, ``TimeoutError``) are not a peer's fault and
        propagate untranslated: the node cannot run without its handler.
        """
        self._calls.check_open()
        if self._handler is not None:
            raise RuntimeError("P2PTransport.start() called twice")
        self._handler = handler  # set first: a stream may arrive before the registration returns
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._p2p.add_binary_stream_handler(self.protocol, self._on_stream)
        except BaseException:
            self._handler = None
            raise

    async def exchange(self, peer_id: str, request: bytes, *, timeout: float,
                       maddrs: Sequence[str] = ()) -> bytes:
        with self._calls.track():
            self.stats.calls_out += 1
            try:
                with _translate_errors(peer_id):
                    async with asyncio.timeout(timeout):
                        return await self._call(peer_id, request, maddrs)
            except PeerError:
                self.stats.failures_out += 1
                raise

    async def close(self) -> None:
        if self._calls.closed:
            return
        self._calls.close()
        self._serving.close()
        if self._handler is None:
            return
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._p2p.remove_binary_stream_handler(self.protocol)
        except (P2PDaemonError, OSError, KeyError) as exc:  # the daemon may already be gone
            logger.debug("could not remove stream handler %s: %r", self.protocol, exc)

    # -- caller side -------------------------------------------------------------------------

    async def _call(self, peer_id: str, request: bytes, maddrs: Sequence[str]) -> bytes:
        check_size(len(request), self.max_message_bytes, what="request", peer=peer_id)
        reader, writer = await self._open_stream(peer_id, maddrs)
        try:
            status, body = await self._roundtrip(reader, writer, request)
        finally:
            writer.close()
        if status == STATUS_REJECTED:
            raise MessageRejected(f"peer rejected the request: {decode_reason(body)}", peer=peer_id)
        return body

    async def _open_stream(self, peer_id: str,
                           maddrs: Sequence[str]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Dial ``maddrs`` if given (a no-op for a connected peer), then open a stream."""
        pid = _parse_peer_id(peer_id)
        addrs = _parse_maddrs(peer_id, maddrs)
        async with asyncio.timeout(self.connect_timeout):
            if addrs:
                await self._p2p._client.connect(pid, addrs)
            _, reader, writer = await self._p2p.call_binary_stream_handler(pid, self.protocol)
        return reader, writer

    async def _roundtrip(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         request: bytes) -> tuple[int, bytes]:
        """Write the request while reading the reply, so an early rejection is seen at once.

        A peer that refuses a request from its header replies before the body is sent; waiting
        for our write to finish first would only end in a reset stream and hide the reason. A
        complete reply ends the exchange even if the write then failed (the peer had what it needed).
        """
        sending = asyncio.ensure_future(
            write_frame(writer, STATUS_OK, request, chunk_bytes=self.chunk_bytes, stats=self.stats))
        try:
            status, body = await read_frame(reader, max_message_bytes=self.max_message_bytes,
                                            chunk_bytes=self.chunk_bytes, stats=self.stats)
            return status, body
        finally:
            if not sending.done():
                sending.cancel()
            await asyncio.wait([sending])
            if not sending.cancelled():
                sending.exception()  # retrieved: a write error after the reply arrived is moot

    # -- server side -------------------------------------------------------------------------

    async def _on_stream(self, info: StreamInfo, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """Serve one incoming stream; raises nothing but a ``CancelledError`` that is not ours."""
        sender = info.peer_id.to_base58()
        self.stats.calls_in += 1
        try:
            with self._serving.track():
                async with asyncio.timeout(self.serve_timeout):
                    await self._serve(sender, reader, writer)
        except Exception as exc:  # caller hung up or broke the framing, deadline, or we closed
            logger.debug("stream from %s ended early: %r", sender, exc)
        finally:
            writer.close()

    async def _serve(self, sender: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, body = await self._read_request(sender, reader)
        await write_frame(writer, status, body, chunk_bytes=self.chunk_bytes, stats=self.stats)
        await self._linger(reader)

    async def _linger(self, reader: asyncio.StreamReader) -> None:
        """After the reply, discard input until the caller hangs up (for at most a short grace).

        Closing a stream before the caller has closed its side lets libp2p reset it, and the reset can
        overtake the reply: after a rejection the request's unread rest, and after a complete reply too
        (two nodes exchanging with each other lost one exchange in 300 to 800 that way: the caller read
        "stream closed after 0 of 8 bytes" and marked a live peer unreachable). A caller reads replies
        while it writes and hangs up as soon as it has one, so this costs the server one round trip.
        """
        try:
            async with asyncio.timeout(_LINGER_S):
                while chunk := await reader.read(self.chunk_bytes):
                    self.stats.bytes_received += len(chunk)
        except TimeoutError:
            logger.debug("caller kept its stream open for %s s after our reply", _LINGER_S)

    async def _read_request(self, sender: str, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        """Read the request and run the handler; return the reply frame ``(status, body)``."""
        try:
            status, request = await read_frame(reader, max_message_bytes=self.max_message_bytes,
                                               chunk_bytes=self.chunk_bytes, stats=self.stats,
                                               screen=self.screen and partial(self.screen, sender))
        except Screened as exc:  # refused from the header by sender and length: the body was not read
            self.stats.rejected_in += 1
            logger.debug("screened out a request from %s: %s", sender, exc)
            return STATUS_REJECTED, encode_reason(str(exc))
        except MessageRejected as exc:
            self.stats.rejected_in += 1
            self.stats.frames_rejected += 1
            logger.debug("rejected a request from %s: %s", sender, exc)
            return STATUS_REJECTED, encode_reason(str(exc))
        if status != STATUS_OK:
            self.stats.rejected_in += 1
            self.stats.frames_rejected += 1
            return STATUS_REJECTED, encode_reason("a request frame must have status ok")
        assert self._handler is not None  # the stream handler is registered by start()
        return await dispatch(self._handler, sender, request, max_message_bytes=self.max_message_bytes,
                              stats=self.stats)
