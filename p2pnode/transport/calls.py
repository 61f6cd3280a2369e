"""Call lifecycle shared by the transports: in-flight tracking on the caller, dispatch on the server.

:class:`CallTracker` makes ``close()`` fail every pending ``exchange`` with
:class:`~p2pnode.errors.TransportClosed` (it cancels them and converts *its own* cancellation, the way
``asyncio.timeout`` converts its own into ``TimeoutError``; any other cancellation propagates).
:func:`dispatch` runs a :data:`~p2pnode.transport.base.Handler` on one request and turns the outcome
into the frame to send back, so both transports reject the same things the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from p2pnode.errors import MessageRejected, TransportClosed
from p2pnode.transport.base import Handler, TransportStats
from p2pnode.transport.framing import STATUS_OK, STATUS_REJECTED, check_size, encode_reason
from protocols.errors import ProtocolError

logger = logging.getLogger(__name__)


class CallTracker:
    """The caller-side exchanges in flight on one transport, and whether it is closed."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self._cancelled_by_close: set[asyncio.Task[object]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def check_open(self) -> None:
        """Raise :class:`TransportClosed` if the transport was closed."""
        if self._closed:
            raise TransportClosed("transport is closed")

    @contextmanager
    def track(self) -> Iterator[None]:
        """Run the body as an in-flight call that :meth:`close` turns into ``TransportClosed``.

        Raises
        ------
        TransportClosed
            If the transport is closed on entry or while the body runs.
        """
        self.check_open()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("CallTracker.track() must run inside an asyncio task")
        baseline = task.cancelling()
        self._tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if task in self._cancelled_by_close:
                self._cancelled_by_close.discard(task)
                if task.uncancel() <= baseline:
                    raise TransportClosed("transport closed during the exchange") from None
            raise
        finally:
            self._tasks.discard(task)
            self._cancelled_by_close.discard(task)

    def close(self) -> None:
        """Mark closed and cancel every call in flight (other than the current task). Idempotent."""
        self._closed = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current and task not in self._cancelled_by_close:
                self._cancelled_by_close.add(task)
                task.cancel("transport closed")


def _rejection(stats: TransportStats, reason: str) -> tuple[int, bytes]:
    stats.rejected_in += 1
    return STATUS_REJECTED, encode_reason(reason)


async def dispatch(handler: Handler, sender: str, request: bytes, *, max_message_bytes: int,
                   stats: TransportStats) -> tuple[int, bytes]:
    """Serve one request and return the ``(status, body)`` frame to send back.

    ``MessageRejected`` and ``ProtocolError`` from the handler become a rejection carrying their
    message; any other exception is logged and becomes a rejection with a generic reason. A reply
    above ``max_message_bytes`` is not sent: the caller gets a rejection instead.
    ``CancelledError`` propagates.
    """
    try:
        reply = await handler(sender, request)
    except (MessageRejected, ProtocolError) as exc:
        logger.debug("rejected a request from %s: %s", sender, exc)
        return _rejection(stats, str(exc) or type(exc).__name__)
    except Exception:
        logger.exception("handler failed on a request from %s", sender)
        return _rejection(stats, "internal error while handling the request")
    try:
        check_size(len(reply), max_message_bytes, what="reply")
    except MessageRejected as exc:
        logger.warning("not sending a reply to %s: %s", sender, exc)
        return STATUS_REJECTED, encode_reason(str(exc))
    return STATUS_OK, reply
