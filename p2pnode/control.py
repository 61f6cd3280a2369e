"""Operator commands: signed, swarm-bound, replay-proof messages that steer running nodes over MQTT.

Wire format of one command (what ``p2pnode control`` publishes, what a node checks)::

    b"P2PC" | version (1 byte, = 1) | operator public key (32 B) | Ed25519 signature (64 B) | body

``body`` is UTF-8 JSON of at most :data:`MAX_BODY` bytes::

    {"cmd": "pause", "swarm": "default", "target": "*" | PEER_ID, "ts": UNIX_SECONDS,
     "nonce": "32 hex chars", "args": {...}}

The signature covers :data:`DOMAIN` followed by the body bytes, so a command is bound to its swarm, its
target and its time. A node checks, in this order and before it parses any JSON: the total size, the
magic and version, that the key is one it was told to trust, and the signature. Only then does it parse
the body and check swarm, target, freshness (``|now - ts| <= window``) and that the nonce is new. Every
failure raises :class:`ControlError` with a short ``reason`` that the node counts.

Commands: ``pause``, ``resume``, ``checkpoint``, ``shutdown``; with ``--test-mode`` also the fault
commands ``crash`` (the process exits at once, as if killed) and ``stall`` (``{"seconds": S}``: the
whole process freezes, as under SIGSTOP).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from p2pnode.errors import P2PNodeError
from protocols.errors import ProtocolError
from protocols.keys import Signer, pubkey_from_peer_id, verify_raw

MAGIC = b"P2PC"
VERSION = 1
DOMAIN = b"p2pnode/control/v1\x00"
MAX_BODY = 1024
_HEADER = len(MAGIC) + 1 + 32 + 64
MAX_COMMAND_BYTES = _HEADER + MAX_BODY
COMMANDS = frozenset({"pause", "resume", "checkpoint", "shutdown"})
FAULT_COMMANDS = frozenset({"crash", "stall"})
MAX_STALL_S = 600.0


class ControlError(P2PNodeError):
    """A command was rejected; ``reason`` is one word the node counts it under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"control command rejected ({reason}): {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Command:
    """A command that passed every check."""

    cmd: str
    operator: str  # peer id of the signing key
    target: str
    ts: float
    nonce: str
    args: dict[str, Any] = field(default_factory=dict)


def _public_key(signer: Signer) -> bytes:
    return pubkey_from_peer_id(signer.peer_id)


def sign_command(signer: Signer, cmd: str, *, swarm: str, target: str = "*",
                 args: dict[str, Any] | None = None, ts: float | None = None,
                 nonce: str | None = None) -> bytes:
    """Build the signed wire form of one command (``ts`` and ``nonce`` default to now and fresh)."""
    body = json.dumps({"cmd": cmd, "swarm": swarm, "target": target,
                       "ts": time.time() if ts is None else ts,
                       "nonce": secrets.token_hex(16) if nonce is None else nonce,
                       "args": args or {}}, separators=(",", ":"), sort_keys=True).encode()
    if len(body) > MAX_BODY:
        raise ValueError(f"command body is {len(body)} B, the limit is {MAX_BODY} B")
    return MAGIC + bytes([VERSION]) + _public_key(signer) + signer.sign(DOMAIN + body) + body


def _is_time(ts: object) -> TypeGuard[int | float]:
    """A finite number of seconds (an int too large for a float is not one: it would overflow later)."""
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return False
    return math.isfinite(ts) if isinstance(ts, float) else abs(ts) <= 2**53


class CommandVerifier:
    """Checks incoming commands for one node (see the module docstring for the order of checks).

    Parameters
    ----------
    trusted
        Peer ids of the operator keys to obey.
    swarm, peer_id
        This node's swarm and id: a command for another swarm or another node is rejected.
    test_mode
        Whether fault commands are allowed.
    window_s
        A command is fresh when its timestamp is within this many seconds of the local clock.
    max_nonces
        Nonces remembered (those of the last ``window_s`` seconds): a bound on memory; when full, new
        commands are refused until old nonces age out.
    """

    def __init__(self, trusted: Iterable[str], *, swarm: str, peer_id: str, test_mode: bool = False,
                 window_s: float = 60.0, max_nonces: int = 4096,
                 clock: Callable[[], float] = time.time) -> None:
        self._trusted: dict[bytes, str] = {}
        for pid in trusted:
            try:
                self._trusted[pubkey_from_peer_id(pid)] = pid
            except ProtocolError as exc:
                raise ValueError(f"operator key {pid!r} is not an Ed25519 peer id: {exc}") from exc
        self.swarm = swarm
        self.peer_id = peer_id
        self.test_mode = test_mode
        self.window_s = window_s
        self.max_nonces = max_nonces
        self._clock = clock
        self._seen: dict[str, float] = {}  # nonce -> ts, insertion-ordered by arrival

    def _forget_old(self, now: float) -> None:
        horizon = now - 2 * self.window_s  # anything older is rejected as stale before the nonce check
        for nonce in [n for n, ts in self._seen.items() if ts < horizon]:
            del self._seen[nonce]

    def open(self, data: bytes) -> Command:
        """Return the command in ``data`` or raise :class:`ControlError`."""
        if not isinstance(data, bytes | bytearray):
            raise ControlError("malformed", f"a command is bytes, got {type(data).__name__}")
        if len(data) > MAX_COMMAND_BYTES:
            raise ControlError("size", f"{len(data)} B is over the {MAX_COMMAND_BYTES} B limit")
        if len(data) <= _HEADER or not data.startswith(MAGIC):
            raise ControlError("unsigned", "not a signed command frame")
        if data[len(MAGIC)] != VERSION:
            raise ControlError("version", f"version {data[len(MAGIC)]} (this node speaks {VERSION})")
        key = bytes(data[len(MAGIC) + 1: len(MAGIC) + 33])
        signature = bytes(data[len(MAGIC) + 33: _HEADER])
        body = bytes(data[_HEADER:])
        operator = self._trusted.get(key)
        if operator is None:
            raise ControlError("untrusted", "signed by a key this node does not trust")
        if not verify_raw(key, DOMAIN + body, signature):
            raise ControlError("signature", f"bad signature for operator {operator}")
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # Recursion: nesting
            raise ControlError("malformed", f"body is not JSON: {type(exc).__name__}: {exc}") from None
        return self._check(obj, operator)

    def _check(self, obj: Any, operator: str) -> Command:
        if not isinstance(obj, dict):
            raise ControlError("malformed", "body is not a JSON object")
        cmd, swarm, target, ts, nonce, args = (obj.get(k) for k in ("cmd", "swarm", "target", "ts", "nonce",
                                                                    "args"))
        if not (isinstance(cmd, str) and isinstance(swarm, str) and isinstance(target, str)
                and isinstance(nonce, str) and 8 <= len(nonce) <= 64 and isinstance(args, dict)
                and _is_time(ts)):
            raise ControlError("malformed", "missing or mistyped field")
        if swarm != self.swarm:
            raise ControlError("swarm", f"command for swarm {swarm!r}, this node is in {self.swarm!r}")
        if target not in ("*", self.peer_id):
            raise ControlError("target", f"command for {target}")
        now = self._clock()
        if abs(now - ts) > self.window_s:
            raise ControlError("stale", f"timestamp {now - ts:+.1f} s off the local clock "
                                        f"(window ±{self.window_s:.0f} s)")
        self._forget_old(now)
        if nonce in self._seen:
            raise ControlError("replay", f"nonce {nonce} was already used")
        if len(self._seen) >= self.max_nonces:
            raise ControlError("flood", f"{self.max_nonces} commands in the last {2 * self.window_s:.0f} s")
        if cmd in FAULT_COMMANDS and not self.test_mode:
            raise ControlError("forbidden", f"{cmd!r} needs --test-mode")
        if cmd not in COMMANDS | FAULT_COMMANDS:
            raise ControlError("unknown", f"unknown command {cmd!r}")
        if cmd == "stall":
            seconds = args.get("seconds")
            if not (isinstance(seconds, int | float) and not isinstance(seconds, bool)
                    and 0 < seconds <= MAX_STALL_S):
                raise ControlError("malformed", f"stall needs args.seconds in (0, {MAX_STALL_S:.0f}]")
        self._seen[nonce] = float(ts)
        return Command(cmd=cmd, operator=operator, target=target, ts=float(ts), nonce=nonce, args=args)
