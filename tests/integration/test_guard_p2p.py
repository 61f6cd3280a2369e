"""The transport's screen between two real libp2p daemons: a refused request never reaches the handler
and its body is never assembled; the framing-level hook refuses from the header alone."""

from __future__ import annotations

import asyncio

import pytest

from p2pnode.errors import MessageRejected
from p2pnode.transport.base import TransportStats
from p2pnode.transport.framing import HEADER_BYTES, STATUS_OK, Screened, encode_header, read_frame
from tests.integration.test_transport_p2p import MiB, run, two_nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_read_frame_asks_the_screen_with_the_announced_length_before_reading_the_body() -> None:
    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(encode_header(STATUS_OK, 5 * MiB) + b"first bytes of the body")
        asked: list[int] = []
        stats = TransportStats()

        def screen(length: int) -> str | None:
            asked.append(length)
            return "refused: banned"

        with pytest.raises(Screened, match="refused: banned"):
            await read_frame(reader, max_message_bytes=8 * MiB, chunk_bytes=MiB, stats=stats, screen=screen)

        assert asked == [5 * MiB]
        assert stats.bytes_received == HEADER_BYTES, "nothing of the body was read"
        assert await reader.read(100) == b"first bytes of the body"

    asyncio.run(scenario())


def test_a_screened_request_is_refused_before_the_handler_and_the_server_keeps_serving() -> None:
    async def scenario() -> None:
        seen: list[bytes] = []

        async def handler(sender: str, request: bytes) -> bytes:
            seen.append(request)
            return b"ok"

        async with two_nodes(handler) as pair:
            screened: list[tuple[str, int]] = []

            def screen(sender: str, size: int) -> str | None:
                screened.append((sender, size))
                return "refused: banned" if size > 1000 else None

            pair.server.screen = screen
            assert await pair.call(b"small") == b"ok"
            with pytest.raises(MessageRejected, match="refused: banned"):
                await pair.call(bytes(4 * MiB))
            assert await pair.call(b"again") == b"ok"

            assert seen == [b"small", b"again"]
            assert screened == [(pair.client.peer_id, 5), (pair.client.peer_id, 4 * MiB),
                                (pair.client.peer_id, 5)]
            assert pair.server.stats.rejected_in == 1
            assert pair.server.stats.frames_rejected == 0, "the node counts its own refusals"

    run(scenario())
