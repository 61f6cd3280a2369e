"""Wire framing shared by every transport: one frame per message, length checked before reading.

A frame is an 8-byte header followed by the body::

    +--------+-----------------------------+------------------------+
    | status |  body length (7 bytes, BE)  |  body (length bytes)   |
    +--------+-----------------------------+------------------------+
      1 byte           7 bytes                written in chunks

``status`` is :data:`STATUS_OK` (the body is a request or a reply) or :data:`STATUS_REJECTED` (the
body is a short UTF-8 reason, at most :data:`MAX_REASON_BYTES`). Seven length bytes allow 2**56 - 1
bytes, far above any sane ``max_message_bytes``. The reader checks the length against its limit
*before* it reads or allocates the body and raises :class:`~p2pnode.errors.MessageRejected`.

One exchange on a stream is: the caller writes one ``STATUS_OK`` frame (the request), the server
writes one frame back (the reply, or a rejection) and closes the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from p2pnode.errors import MessageRejected
from p2pnode.transport.base import TransportStats

HEADER_BYTES = 8
STATUS_OK = 0
STATUS_REJECTED = 1
MAX_REASON_BYTES = 200
_LENGTH_BYTES = HEADER_BYTES - 1
_MAX_LENGTH = (1 << (8 * _LENGTH_BYTES)) - 1
_STATUSES = (STATUS_OK, STATUS_REJECTED)


def framed_size(body_length: int) -> int:
    """Bytes a body of ``body_length`` bytes occupies on the wire (header included)."""
    return HEADER_BYTES + body_length


def encode_header(status: int, length: int) -> bytes:
    """Pack a frame header.

    Raises
    ------
    ValueError
        If ``status`` is unknown or ``length`` does not fit in 7 bytes.
    """
    if status not in _STATUSES:
        raise ValueError(f"unknown frame status {status}; valid: {_STATUSES}")
    if not 0 <= length <= _MAX_LENGTH:
        raise ValueError(f"frame length {length} out of range [0, {_MAX_LENGTH}]")
    return bytes([status]) + length.to_bytes(_LENGTH_BYTES, "big")


def decode_header(header: bytes, *, max_message_bytes: int) -> tuple[int, int]:
    """Unpack and validate a frame header; return ``(status, body_length)``.

    Raises
    ------
    MessageRejected
        If the status byte is unknown, the body is longer than ``max_message_bytes``, or a
        rejection's reason is longer than :data:`MAX_REASON_BYTES`.
    """
    if len(header) != HEADER_BYTES:
        raise MessageRejected(f"frame header has {len(header)} bytes, expected {HEADER_BYTES}")
    status, length = header[0], int.from_bytes(header[1:], "big")
    if status not in _STATUSES:
        raise MessageRejected(f"unknown frame status {status}")
    if length > max_message_bytes:
        raise MessageRejected(f"message of {length} bytes exceeds max_message_bytes={max_message_bytes}")
    if status == STATUS_REJECTED and length > MAX_REASON_BYTES:
        raise MessageRejected(f"rejection reason of {length} bytes exceeds {MAX_REASON_BYTES}")
    return status, length


def encode_reason(reason: str) -> bytes:
    """UTF-8 encode ``reason``, cut to at most :data:`MAX_REASON_BYTES` on a character boundary."""
    raw = reason.encode("utf-8")[:MAX_REASON_BYTES]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")


def decode_reason(body: bytes) -> str:
    """Decode a rejection body (never raises: invalid UTF-8 is replaced)."""
    return body.decode("utf-8", errors="replace")


def check_size(length: int, max_message_bytes: int, *, what: str, peer: str | None = None) -> None:
    """Raise :class:`MessageRejected` if a ``what`` of ``length`` bytes exceeds the limit."""
    if length > max_message_bytes:
        raise MessageRejected(f"{what} of {length} bytes exceeds max_message_bytes={max_message_bytes}",
                              peer=peer)


async def write_frame(writer: asyncio.StreamWriter, status: int, body: bytes, *, chunk_bytes: int,
                      stats: TransportStats) -> None:
    """Write one frame, draining after each chunk; count every byte in ``stats.bytes_sent``."""
    writer.write(encode_header(status, len(body)))
    stats.bytes_sent += HEADER_BYTES
    view = memoryview(body)
    for offset in range(0, len(view), chunk_bytes):
        chunk = view[offset:offset + chunk_bytes]
        writer.write(chunk)
        await writer.drain()
        stats.bytes_sent += len(chunk)
    await writer.drain()


class Screened(MessageRejected):
    """A frame's ``screen`` refused it from its header (the body was not read)."""


async def read_frame(reader: asyncio.StreamReader, *, max_message_bytes: int, chunk_bytes: int,
                     stats: TransportStats,
                     screen: Callable[[int], str | None] | None = None) -> tuple[int, bytes]:
    """Read one frame; return ``(status, body)``. Counts bytes in ``stats.bytes_received``.

    ``screen``, if given, is called with the announced body length before the body is read; a reason
    it returns is raised as :class:`Screened`.

    Raises
    ------
    MessageRejected
        If the header is invalid or announces a body above ``max_message_bytes`` (nothing more is
        read in that case); :class:`Screened` if ``screen`` refused it.
    asyncio.IncompleteReadError
        If the stream ends before the frame does.
    """
    header = await reader.readexactly(HEADER_BYTES)
    stats.bytes_received += HEADER_BYTES
    status, length = decode_header(header, max_message_bytes=max_message_bytes)
    if screen is not None and (reason := screen(length)) is not None:
        raise Screened(reason)
    chunks: list[bytes] = []
    remaining = length
    while remaining:
        chunk = await reader.readexactly(min(remaining, chunk_bytes))
        stats.bytes_received += len(chunk)
        chunks.append(chunk)
        remaining -= len(chunk)
    return status, b"".join(chunks)
