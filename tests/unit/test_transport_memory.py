"""MemoryTransport and the shared framing: the transport contract without libp2p."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import MessageRejected, PeerUnreachable, TransportClosed
from p2pnode.transport import MemoryNetwork, MemoryTransport
from p2pnode.transport.base import TransportStats
from p2pnode.transport.framing import (
    HEADER_BYTES,
    MAX_REASON_BYTES,
    STATUS_OK,
    STATUS_REJECTED,
    decode_header,
    encode_header,
    encode_reason,
    read_frame,
    write_frame,
)
from protocols.errors import ProtocolError


def run(coro: Awaitable[Any]) -> Any:
    """Run one test coroutine in a fresh event loop."""
    async def main() -> Any:
        return await coro
    return asyncio.run(main())


async def echo(sender: str, request: bytes) -> bytes:
    return sender.encode() + b":" + request


def pair(handler: Callable[[str, bytes], Awaitable[bytes]] = echo, **server_kw: Any
         ) -> tuple[MemoryNetwork, MemoryTransport, MemoryTransport]:
    """A network with a client ``a`` and a server ``b`` (``b`` not started yet)."""
    net = MemoryNetwork()
    return net, MemoryTransport(net, "a"), MemoryTransport(net, "b", **server_kw)


# -- exchange ------------------------------------------------------------------------------------


def test_exchange_returns_reply_and_passes_sender() -> None:
    async def scenario() -> bytes:
        _, a, b = pair()
        await b.start(echo)
        return await a.exchange("b", b"hi", timeout=1.0)

    assert run(scenario()) == b"a:hi"


def test_stats_count_framed_bytes_on_both_sides() -> None:
    async def scenario() -> tuple[TransportStats, TransportStats]:
        _, a, b = pair()
        await b.start(echo)
        await a.exchange("b", b"x" * 100, timeout=1.0)
        return a.stats, b.stats

    a_stats, b_stats = run(scenario())
    request, reply = HEADER_BYTES + 100, HEADER_BYTES + 102
    assert (a_stats.bytes_sent, a_stats.bytes_received, a_stats.calls_out) == (request, reply, 1)
    assert (b_stats.bytes_received, b_stats.bytes_sent, b_stats.calls_in) == (request, reply, 1)
    assert a_stats.failures_out == b_stats.rejected_in == 0


@pytest.mark.parametrize("case", ["unknown", "closed", "not_started"])
def test_unreachable_peers(case: str) -> None:
    async def scenario() -> MemoryTransport:
        _, a, b = pair()
        if case == "closed":
            await b.start(echo)
            await b.close()
        target = "nobody" if case == "unknown" else "b"
        with pytest.raises(PeerUnreachable):
            await a.exchange(target, b"hi", timeout=1.0)
        return a

    assert run(scenario()).stats.failures_out == 1


def test_timeout_raises_peer_unreachable_promptly() -> None:
    async def slow(sender: str, request: bytes) -> bytes:
        await asyncio.sleep(10)
        return request

    async def scenario() -> float:
        _, a, b = pair()
        await b.start(slow)
        started = time.monotonic()
        with pytest.raises(PeerUnreachable, match="no reply within"):
            await a.exchange("b", b"hi", timeout=0.05)
        return time.monotonic() - started

    assert run(scenario()) < 1.0


def test_latency_applies_each_way_and_counts_against_timeout() -> None:
    async def scenario() -> float:
        net = MemoryNetwork()
        a, b = MemoryTransport(net, "a", latency_s=0.02), MemoryTransport(net, "b")
        await b.start(echo)
        started = time.monotonic()
        await a.exchange("b", b"hi", timeout=1.0)
        elapsed = time.monotonic() - started
        with pytest.raises(PeerUnreachable):
            await a.exchange("b", b"hi", timeout=0.03)
        return elapsed

    assert run(scenario()) >= 0.04


# -- rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "reason"), [
    (MessageRejected("bad signature"), "bad signature"),
    (ProtocolError("truncated envelope"), "truncated envelope"),
    (RuntimeError("secret detail"), "internal error"),
])
def test_handler_errors_become_message_rejected(error: Exception, reason: str) -> None:
    async def failing(sender: str, request: bytes) -> bytes:
        raise error

    async def scenario() -> tuple[MemoryTransport, MemoryTransport]:
        _, a, b = pair()
        await b.start(failing)
        with pytest.raises(MessageRejected, match=reason) as info:
            await a.exchange("b", b"hi", timeout=1.0)
        assert info.value.peer == "b"
        return a, b

    a, b = run(scenario())
    assert (a.stats.failures_out, b.stats.rejected_in) == (1, 1)


def test_oversized_request_is_refused_by_the_sender_without_calling_the_peer() -> None:
    calls: list[bytes] = []

    async def recording(sender: str, request: bytes) -> bytes:
        calls.append(request)
        return request

    async def scenario() -> None:
        net = MemoryNetwork()
        a = MemoryTransport(net, "a", max_message_bytes=10)
        b = MemoryTransport(net, "b")
        await b.start(recording)
        with pytest.raises(MessageRejected, match="exceeds max_message_bytes=10"):
            await a.exchange("b", b"x" * 11, timeout=1.0)

    run(scenario())
    assert calls == []


def test_oversized_request_is_rejected_by_the_receiver_which_keeps_serving() -> None:
    async def scenario() -> MemoryTransport:
        _, a, b = pair(max_message_bytes=10)
        await b.start(echo)
        with pytest.raises(MessageRejected, match="peer rejected the request"):
            await a.exchange("b", b"x" * 11, timeout=1.0)
        assert await a.exchange("b", b"ok", timeout=1.0) == b"a:ok"
        return b

    stats = run(scenario()).stats
    assert stats.rejected_in == stats.frames_rejected == 1


def test_oversized_reply_is_rejected_by_the_caller() -> None:
    async def scenario() -> None:
        net = MemoryNetwork()
        a = MemoryTransport(net, "a", max_message_bytes=5)
        b = MemoryTransport(net, "b")
        await b.start(echo)
        with pytest.raises(MessageRejected, match="reply of 6 bytes"):
            await a.exchange("b", b"hiya", timeout=1.0)

    run(scenario())


def test_server_refuses_to_send_a_reply_above_its_own_limit() -> None:
    async def huge(sender: str, request: bytes) -> bytes:
        return b"y" * 64

    async def scenario() -> None:
        _, a, b = pair(max_message_bytes=32)
        await b.start(huge)
        with pytest.raises(MessageRejected, match="reply of 64 bytes"):
            await a.exchange("b", b"hi", timeout=1.0)

    run(scenario())


# -- lifecycle -----------------------------------------------------------------------------------


def test_close_makes_later_calls_raise_transport_closed_and_is_idempotent() -> None:
    async def scenario() -> None:
        net, a, b = pair()
        await b.start(echo)
        await a.close()
        await a.close()
        with pytest.raises(TransportClosed):
            await a.exchange("b", b"hi", timeout=1.0)
        with pytest.raises(TransportClosed):
            await a.start(echo)
        assert net.peer_ids == ["b"]

    run(scenario())


def test_close_fails_pending_calls_with_transport_closed() -> None:
    async def stuck(sender: str, request: bytes) -> bytes:
        await asyncio.sleep(10)
        return request

    async def scenario() -> None:
        _, a, b = pair()
        await b.start(stuck)
        call = asyncio.ensure_future(a.exchange("b", b"hi", timeout=5.0))
        await asyncio.sleep(0.01)
        await a.close()
        with pytest.raises(TransportClosed):
            await call

    run(scenario())


def test_outside_cancellation_still_propagates() -> None:
    async def stuck(sender: str, request: bytes) -> bytes:
        await asyncio.sleep(10)
        return request

    async def scenario() -> None:
        _, a, b = pair()
        await b.start(stuck)
        call = asyncio.ensure_future(a.exchange("b", b"hi", timeout=5.0))
        await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert not a.stats.failures_out

    run(scenario())


def test_misuse_is_an_error() -> None:
    async def scenario() -> None:
        net, _, b = pair()
        with pytest.raises(ValueError, match="already on this network"):
            MemoryTransport(net, "b")
        await b.start(echo)
        with pytest.raises(RuntimeError, match="twice"):
            await b.start(echo)

    run(scenario())
    with pytest.raises(ValueError, match="max_message_bytes"):
        MemoryTransport(MemoryNetwork(), "x", max_message_bytes=0)


# -- framing -------------------------------------------------------------------------------------


@given(status=st.sampled_from([STATUS_OK, STATUS_REJECTED]), length=st.integers(0, MAX_REASON_BYTES))
def test_header_roundtrip(status: int, length: int) -> None:
    header = encode_header(status, length)
    assert len(header) == HEADER_BYTES
    assert decode_header(header, max_message_bytes=MAX_REASON_BYTES) == (status, length)


@pytest.mark.parametrize(("header", "match"), [
    (encode_header(STATUS_OK, 1001), "exceeds max_message_bytes=1000"),
    (bytes([7]) + bytes(7), "unknown frame status"),
    (encode_header(STATUS_REJECTED, MAX_REASON_BYTES + 1), "rejection reason"),
    (b"\x00\x00", "expected 8"),
])
def test_bad_headers_are_rejected(header: bytes, match: str) -> None:
    with pytest.raises(MessageRejected, match=match):
        decode_header(header, max_message_bytes=1000)


@given(st.text(max_size=300))
def test_reason_is_cut_on_a_character_boundary(reason: str) -> None:
    encoded = encode_reason(reason)
    assert len(encoded) <= MAX_REASON_BYTES
    assert reason.startswith(encoded.decode("utf-8"))


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_read_frame_checks_length_before_reading_the_body() -> None:
    async def scenario() -> TransportStats:
        stats = TransportStats()
        reader = _reader(encode_header(STATUS_OK, 1 << 40) + b"body")
        with pytest.raises(MessageRejected):
            await read_frame(reader, max_message_bytes=1 << 20, chunk_bytes=4, stats=stats)
        assert await reader.read() == b"body"
        return stats

    assert run(scenario()).bytes_received == HEADER_BYTES


def test_write_then_read_frame_in_chunks() -> None:
    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, chunk: bytes) -> None:
            self.data += chunk

        async def drain(self) -> None:
            return None

    async def scenario() -> tuple[tuple[int, bytes], TransportStats, TransportStats]:
        sink, sent, received = Sink(), TransportStats(), TransportStats()
        await write_frame(sink, STATUS_OK, b"0123456789", chunk_bytes=3, stats=sent)  # type: ignore[arg-type]
        frame = await read_frame(_reader(bytes(sink.data)), max_message_bytes=10, chunk_bytes=4,
                                 stats=received)
        return frame, sent, received

    frame, sent, received = run(scenario())
    assert frame == (STATUS_OK, b"0123456789")
    assert sent.bytes_sent == received.bytes_received == HEADER_BYTES + 10
