"""The daemon's exception tree.

``P2PNodeError`` is the root. Below it, errors are split by *who is at fault*:

- :class:`ConfigError` — the user's configuration is invalid (CLI exits with code 2).
- :class:`TaskError` — a task could not be built or its data could not be loaded.
- :class:`IdentityError` — the key file is missing, unreadable or malformed.
- :class:`PeerError` — a remote peer broke the protocol or sent garbage. Subclasses:
  :class:`PeerUnreachable` (could not connect or no answer before the deadline) and
  :class:`MessageRejected` (answered, but what it sent failed validation).
- :class:`TransportClosed` — *we* closed the transport; not the peer's fault.
- :class:`TrainProcessError` — ``--train-process``: the node's training process failed.

Errors raised by libraries (hivemind, libp2p daemon, OSError, asyncio timeouts) are translated
into these in exactly one place per layer (see ``p2pnode.transport.p2p``).
"""

from __future__ import annotations


class P2PNodeError(Exception):
    """Root of every error raised on purpose by p2pnode."""


class ConfigError(P2PNodeError, ValueError):
    """An invalid configuration value.

    ``field`` is the dotted config path (``"gossip.fanout"``); ``allowed`` describes valid values.
    ``str(err)`` is a single line suitable for the CLI.
    """

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"invalid value for {field}: {value!r} (allowed: {allowed})")


class TaskError(P2PNodeError):
    """A task could not be constructed or its data could not be loaded."""


class IdentityError(P2PNodeError):
    """The node's key file is missing, has unsafe permissions, or is malformed."""


class PeerError(P2PNodeError):
    """A remote peer failed; carries the peer id when known."""

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        self.peer = peer
        super().__init__(f"{message} (peer {peer})" if peer else message)


class PeerUnreachable(PeerError):
    """Could not open a stream to the peer, or it did not answer before the deadline."""


class MessageRejected(PeerError):
    """The peer answered but its message failed validation (size, signature, shape, values)."""


class TransportClosed(P2PNodeError):
    """The local transport was shut down; raised to callers still waiting on it."""


class TrainProcessError(P2PNodeError):
    """``--train-process``: the training process died, or a request there failed with an error that is
    not re-raised as its own type (see :mod:`p2pnode.train_process`)."""
