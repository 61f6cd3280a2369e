"""The sending side of ``p2pnode bench fuzz``: lanes of libp2p hosts, each sending one message at a time.

A lane is a hivemind ``P2P`` host with its own Ed25519 key and a :class:`~p2pnode.transport.p2p.P2PTransport`
on it, exactly what a node uses to call a peer. Messages go through ``exchange`` (framed, with a
deadline); raw frames go onto a bare stream to the same handler. One lane sends one message at a
time, so the node sees each lane's sequence numbers in order and a valid message is never refused as
a replay of a concurrent one; the lanes run concurrently. Each outcome is compared with what the
message was built for (:mod:`p2pnode.bench.fuzz_messages`).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hivemind.p2p import P2P, P2PDaemonError

from p2pnode.bench.fuzz_messages import ACCEPT, Lane, Message, MessageFactory, Target
from p2pnode.errors import MessageRejected, PeerUnreachable
from p2pnode.identity import Identity, save_identity
from p2pnode.transport.base import TransportStats
from p2pnode.transport.framing import STATUS_REJECTED, decode_reason, read_frame
from p2pnode.transport.p2p import P2PTransport
from protocols.envelope import open_envelope
from protocols.errors import ProtocolError
from protocols.exchange import unpack_exchange
from protocols.model import decode_model

OK, REJECTED, INTERNAL, TIMEOUT, DROPPED = "ok", "rejected", "internal", "timeout", "dropped"
BAD_REPLY = "bad-reply"
_INTERNAL = "internal error while handling the request"  # what dispatch answers for an untyped exception
_CLIENT_LIMIT = 64 * 2**20  # the lanes send what the node must refuse, so their own limit is higher
_PEER_SUFFIX = re.compile(r" \(peer [1-9A-HJ-NP-Za-km-z]+\)")


@dataclass(slots=True)
class LaneResult:
    """What one lane sent and what came back."""

    outcomes: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    by_category: dict[str, Counter[str]] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # a few rejection reasons per category
    mismatches: list[dict[str, str]] = field(default_factory=list)
    max_latency_s: float = 0.0

    def record(self, msg: Message, outcome: str, reason: str, latency: float) -> None:
        self.outcomes[outcome] += 1
        self.expected[msg.expect] += 1
        self.by_category.setdefault(msg.category, Counter())[outcome] += 1
        self.max_latency_s = max(self.max_latency_s, latency)
        kept = self.reasons.setdefault(msg.category, [])
        if reason and len(kept) < 3 and reason not in kept:
            kept.append(reason)
        if outcome != (OK if msg.expect == ACCEPT else REJECTED) and len(self.mismatches) < 50:
            self.mismatches.append({"category": msg.category, "expect": msg.expect, "outcome": outcome,
                                    "reason": reason[:300]})


class _Pacer:
    """Spaces sends over all lanes to at most ``rate`` per second (0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = asyncio.get_running_loop().time()
        slot = max(now, self._next)
        self._next = slot + self.interval
        await asyncio.sleep(slot - now)


@dataclass(slots=True)
class _Sender:
    target: Target
    maddrs: Sequence[str]
    p2p: P2P
    transport: P2PTransport
    factory: MessageFactory
    timeout_s: float

    def _reply_model(self, reply: bytes) -> torch.Tensor:
        """The model in the node's reply to a valid push; ProtocolError if the reply is not one."""
        t = self.target
        env = open_envelope(reply, max_bytes=_CLIENT_LIMIT, swarm=t.swarm, kinds=("pull",))
        if env.sender != t.peer_id:
            raise ProtocolError(f"reply signed by {env.sender}, not by the node")
        model, attachment = unpack_exchange(env.payload, max_bytes=_CLIENT_LIMIT)
        if attachment is not None:
            raise ProtocolError("reply carries an attachment")
        return decode_model(model, expected_numel=t.numel, fingerprint=t.fingerprint).flat

    async def send(self, msg: Message) -> tuple[str, str]:
        """Send ``msg``; return its outcome and the node's reason for a rejection."""
        try:
            if msg.frame is not None:
                return await self._send_frame(msg.frame)
            reply = await self.transport.exchange(self.target.peer_id, msg.data, timeout=self.timeout_s,
                                                  maddrs=self.maddrs)
        except MessageRejected as exc:
            reason = _PEER_SUFFIX.sub("", str(exc))
            return (INTERNAL if _INTERNAL in reason else REJECTED), reason
        except PeerUnreachable as exc:
            return (TIMEOUT if isinstance(exc.__cause__, TimeoutError) else DROPPED), str(exc)
        try:
            self.factory.lane.model = self._reply_model(reply)
        except ProtocolError as exc:
            return BAD_REPLY, str(exc)
        return OK, ""

    async def _send_frame(self, frame: bytes) -> tuple[str, str]:
        """Write ``frame`` on a bare stream to the node's handler and read the frame it answers."""
        try:
            async with asyncio.timeout(self.timeout_s):
                # the transport's own dialing and stream opening: the stream reaches the node as exchanges do
                reader, writer = await self.transport._open_stream(self.target.peer_id, self.maddrs)
                try:
                    writer.write(frame)
                    await writer.drain()
                    status, body = await read_frame(reader, max_message_bytes=_CLIENT_LIMIT,
                                                    chunk_bytes=1 << 20, stats=TransportStats())
                finally:
                    writer.close()
        except TimeoutError:
            return TIMEOUT, "no answer to a raw frame before the deadline"
        except (asyncio.IncompleteReadError, ConnectionError, OSError, P2PDaemonError) as exc:
            return DROPPED, f"{type(exc).__name__}: {exc}"
        if status == STATUS_REJECTED:
            return REJECTED, decode_reason(body)
        return OK, ""


async def _run_lane(sender: _Sender, tickets: Iterator[int], total: int, pacer: _Pacer,
                    result: LaneResult) -> None:
    loop = asyncio.get_running_loop()
    for _ in itertools.takewhile(lambda i: i < total, tickets):
        msg = sender.factory.next()
        await pacer.wait()
        started = loop.time()
        outcome, reason = await sender.send(msg)
        result.record(msg, outcome, reason, loop.time() - started)


async def _report(results: list[LaneResult], total: int, progress: Callable[[str], None]) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        await asyncio.sleep(10)
        sent = sum(sum(r.outcomes.values()) for r in results)
        progress(f"sent {sent:,}/{total:,} ({sent / (loop.time() - started):.0f} msgs/s)")


async def run_lanes(target: Target, maddrs: Sequence[str], messages: int, *, lanes: int, seed: int,
                    timeout_s: float, rate: float, keys: Path,
                    progress: Callable[[str], None] = lambda _: None) -> list[LaneResult]:
    """Send ``messages`` fuzzed messages to ``target`` over ``lanes`` concurrent hosts; their results."""
    keys.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before any host starts, nothing else runs
    p2ps: list[P2P] = []
    transports: list[P2PTransport] = []
    try:
        senders = []
        for i in range(lanes):
            identity = Identity.generate()
            path = save_identity(identity, keys / f"lane-{i}.key", overwrite=True)
            p2ps.append(await P2P.create(identity_path=str(path), host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
            transports.append(P2PTransport(p2ps[-1], max_message_bytes=_CLIENT_LIMIT,
                                           connect_timeout=timeout_s))
            lane = Lane(identity=identity, rng=random.Random(f"{seed}/{i}"))
            senders.append(_Sender(target, maddrs, p2ps[-1], transports[-1], MessageFactory(target, lane),
                                   timeout_s))
        results = [LaneResult() for _ in senders]
        tickets, pacer = itertools.count(), _Pacer(rate)
        async with asyncio.TaskGroup() as tg:
            reporter = tg.create_task(_report(results, messages, progress))
            await asyncio.gather(*(_run_lane(s, tickets, messages, pacer, r)
                                   for s, r in zip(senders, results)))
            reporter.cancel()
        return results
    finally:
        for transport in transports:
            await transport.close()
        for p2p in p2ps:
            await p2p.shutdown()
