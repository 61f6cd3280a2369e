"""``--mode increments``: FedAvg where each node pushes its compressed increment to every peer (with EF).

Every node keeps a global model ``G`` (``x0`` at the start: every node builds the same initial model)
and a residual ``e`` (zero at the start). Round ``r`` of node ``i``:

1. load ``G`` into the model (the optimizer's momentum buffer is kept, never reset);
2. ``H`` local SGD steps → ``x_i``;
3. ``u_i = e_i + (x_i − G)``;
4. ``q_i = decode(encode(u_i))`` with the configured codec, ``e_i ← u_i − q_i`` (error feedback, Seide et
   al. 2014; Lin et al. 2018 "Deep Gradient Compression"; the decoded ``q_i``, so codec rounding is fed
   back too). For ``topk`` the kept ratio is ``ratio · 2^(W − r + 1)`` (capped at 1) in rounds
   ``r ≤ W = gossip.increments_warmup``: with ``W = 2``, 4× in round 1 and 2× in round 2;
5. push the payload of ``q_i``, in a signed envelope of kind ``ib`` for round ``r``, to every live peer;
6. wait until every peer pushed to has delivered its increment of round ``r`` (or ``timeouts.exchange``
   passed), then ``G ← G + (1/m) Σ_j q_j`` over the ``m`` increments of round ``r`` held (own included),
   summed in sorted peer-id order, so that ``G`` is bit-identical on every node that holds the same set.

The model a node evaluates and serves is ``G``. This is FedAvg (McMahan et al. 2017) with every node as
its own server; it merges by the plain mean and is **not** Byzantine-robust (a single peer can move
``G`` anywhere): configuration validation refuses any ``--defense`` but ``mean``.

Receiving: the envelope is verified before anything in it is parsed; one increment per (origin, round)
is kept, for rounds ``applied < r ≤ applied + WINDOW``; a second copy is rejected (a different one is an
equivocation and counted as such), a round outside the window is rejected, and an increment for a round
already applied (``applied − WINDOW < r ≤ applied``) is counted as late and still added: that round's
mean is recomputed with it (``G += (S + q)/(m + 1) − S/m``, ``S`` the round's sum of ``m`` increments), so
a node that got it late ends up with the G of the nodes that got it on time (to float rounding, no
longer bit for bit). An increment that never arrives is not fetched again: there is no anti-entropy.
Each is decoded by the codec, which checks sizes before allocating. The reply is a signed ``ia``
envelope with an empty payload. Memory is bounded: increments are kept only for rounds in the window,
from at most ``gossip.max_inbox`` origins per round.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from defenses import Aggregator
from p2pnode.config import NodeConfig
from p2pnode.errors import MessageRejected
from p2pnode.identity import Identity
from p2pnode.node import Node, PeerView, RoundReport
from p2pnode.trainer import LocalTrainer
from p2pnode.transport.base import Transport
from protocols.codecs import Codec, Layout, make_codec
from protocols.codecs.topk import TopKCodec
from protocols.envelope import Envelope
from protocols.errors import ProtocolError
from protocols.records import MembershipRecord

logger = logging.getLogger(__name__)

# envelope kinds are on the wire of every message, so they are two letters: increment, acknowledgement
KIND_INCREMENT, KIND_ACK = "ib", "ia"
WINDOW = 4  # rounds ahead of (and behind) the last applied round that an increment may be for


class Equivocation(ProtocolError):
    """An origin sent two different increments for one round."""


@dataclass(slots=True)
class Held:
    """One received (or own) increment: its payload digest and decoded value."""

    digest: bytes
    value: torch.Tensor


def warmup_codec(codec: Codec, round: int, warmup: int) -> Codec:
    """The codec of round ``round`` (1-based): topk keeps ``ratio · 2^(warmup − round + 1)`` (at most
    everything) in the first ``warmup`` rounds; any other codec, or a later round, is ``codec`` itself."""
    if not isinstance(codec, TopKCodec) or round > warmup:
        return codec
    return TopKCodec(min(1.0, codec.ratio * 2.0 ** (warmup - round + 1)))


class IncrementsNode(Node):
    """A node in ``--mode increments`` (module docstring)."""

    role = "honest"

    def __init__(self, config: NodeConfig, identity: Identity, trainer: LocalTrainer, transport: Transport,
                 membership: PeerView, aggregator: Aggregator) -> None:
        super().__init__(config, identity, trainer, transport, membership, aggregator)
        self.codec = make_codec(config.gossip.codec)
        self.layout = Layout(shapes=tuple(la.shape for la in self.layers))
        self._codec_state = self.codec.new_state(self.layout)
        self.global_model = trainer.get_flat()  # G: x0, the same on every node
        self.residual = torch.zeros_like(self.global_model)  # e
        self.applied = 0  # the last round whose increments were added to G
        self.held: dict[int, dict[str, Held]] = {}  # round -> origin -> increment, rounds not applied yet
        # the last WINDOW applied rounds: (origin -> payload digest, sum of their increments, count)
        self._applied_rounds: dict[int, tuple[dict[str, bytes], torch.Tensor, int]] = {}
        self._round_start = self.global_model  # the G this round's training started from
        self._known: dict[str, MembershipRecord] = {}  # every peer seen live (its addresses)
        self.held_senders_of_last_round: frozenset[str] = frozenset()  # peers applied last round
        self._arrived = asyncio.Event()
        self.increments_late = 0  # arrived for a round already applied
        self.increments_missing = 0  # expected from a peer but not there by the deadline
        self.equivocations = 0
        self.payload_bytes_sent = 0  # codec payloads only (bytes_sent adds envelopes and framing)

    # -- receiving ---------------------------------------------------------------------------------
    def _take(self, sender: str, env: Envelope) -> None:
        """Keep the increment in a verified envelope (ProtocolError if it is refused)."""
        r = env.round
        if max(0, self.applied - WINDOW) < r <= self.applied:
            self._take_late(sender, r, env.payload)
            return
        if not self.applied < r <= self.applied + WINDOW:
            raise ProtocolError(f"increment for round {r} is outside our window "
                                f"({self.applied - WINDOW + 1}..{self.applied + WINDOW})")
        round_held = self.held.get(r, {})
        prev = round_held.get(sender)
        digest, value = self._admit(sender, r, env.payload, prev.digest if prev else None, len(round_held))
        self.held.setdefault(r, {})[sender] = Held(digest, value)
        self._arrived.set()

    def _take_late(self, sender: str, r: int, payload: bytes) -> None:
        """An increment for applied round ``r``: recompute that round's mean with it (module docstring)."""
        digests, total, m = self._applied_rounds[r]
        digest, value = self._admit(sender, r, payload, digests.get(sender), len(digests))
        new_total = total + value
        self.global_model = self.global_model + (new_total / (m + 1) - total / m)
        self._applied_rounds[r] = ({**digests, sender: digest}, new_total, m + 1)
        self.increments_late += 1
        logger.info("late increment of round %d from %s added (applied %d)", r, sender, self.applied)

    def _admit(self, sender: str, r: int, payload: bytes, prev: bytes | None, count: int
               ) -> tuple[bytes, torch.Tensor]:
        """Check a new increment of ``sender`` for round ``r`` against what that round holds (``prev``: the
        digest already held from ``sender``, ``count``: increments held) and decode it; returns its
        digest and value. ProtocolError (Equivocation, CodecError) if it is refused."""
        digest = hashlib.sha256(payload).digest()
        if prev is not None:
            if prev != digest:
                self.equivocations += 1
                raise Equivocation(f"a second, different increment for round {r}")
            raise ProtocolError(f"a second copy of the increment for round {r}")
        if count >= self.config.gossip.max_inbox:
            raise ProtocolError(f"already {count} increments for round {r} (gossip.max_inbox)")
        return digest, self.codec.decode(payload, self.layout)  # CodecError (a ProtocolError) if malformed

    async def serve(self, sender: str, request: bytes) -> bytes:
        """Transport handler: keep a pushed increment, reply with a signed empty acknowledgement."""
        try:
            self._take(sender, self._open_from(sender, request, (KIND_INCREMENT,)))
        except ProtocolError as exc:
            self._reject(sender, exc)
            raise MessageRejected(str(exc), peer=sender) from exc
        self.membership.mark_alive(sender)
        return self._seal(KIND_ACK, b"")

    # -- sending -----------------------------------------------------------------------------------
    def compress(self, x: torch.Tensor, round: int) -> bytes:
        """Steps 3–4: encode ``u = e + (x − G)``, keep the decoded ``q`` as our own increment of ``round``
        and ``u − q`` as the residual; return the payload."""
        u = self.residual + (x - self._round_start)
        codec = warmup_codec(self.codec, round, self.config.gossip.increments_warmup)
        payload = codec.encode(u, self.layout, self._codec_state if codec is self.codec else None)
        q = self.codec.decode(payload, self.layout)
        self.residual = u - q
        self.held.setdefault(round, {})[self.identity.peer_id] = Held(hashlib.sha256(payload).digest(), q)
        return payload

    async def _push(self, peer: MembershipRecord, request: bytes) -> bool:
        """Push our increment to ``peer``; True if it acknowledged."""
        reply = await self._request(peer, request)
        if reply is None:
            return False
        try:
            self._open_from(peer.peer_id, reply, (KIND_ACK,))
        except ProtocolError as exc:
            self._reject(peer.peer_id, exc)
            return False
        return True

    def _targets(self) -> list[MembershipRecord]:
        """Live peers, plus those that sent an increment for the last applied round (a peer whose record
        is briefly missing from the view still gets ours, so the sets held stay the same everywhere)."""
        live = {p.peer_id: p for p in self.membership.live()}
        self._known.update(live)
        last = self.held_senders_of_last_round
        for peer_id in last:
            if peer_id not in live and peer_id in self._known:
                live[peer_id] = self._known[peer_id]
        live.pop(self.identity.peer_id, None)
        return [live[p] for p in sorted(live)]

    # -- rounds ------------------------------------------------------------------------------------
    async def _await_round(self, round: int, expected: set[str]) -> None:
        """Wait until every peer in ``expected`` delivered its increment of ``round``, or the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeouts.exchange
        while not expected <= self.held.get(round, {}).keys():
            remaining = deadline - loop.time()
            if remaining <= 0:
                missing = expected - self.held.get(round, {}).keys()
                self.increments_missing += len(missing)
                logger.warning("round %d: no increment from %d peers by the deadline", round, len(missing))
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def apply_round(self, round: int) -> int:
        """Step 6: ``G ← G + (1/m) Σ_j q_j`` in sorted origin order; forget rounds up to ``round``."""
        increments = self.held.get(round, {})
        total = torch.zeros_like(self.global_model)
        for origin in sorted(increments):
            total += increments[origin].value
        self.global_model = self.global_model + total / len(increments)
        self.held_senders_of_last_round = frozenset(increments) - {self.identity.peer_id}
        self.applied = round
        self._applied_rounds[round] = ({o: h.digest for o, h in increments.items()}, total, len(increments))
        for r in [r for r in self.held if r <= round]:
            del self.held[r]
        for r in [r for r in self._applied_rounds if r <= round - WINDOW]:
            del self._applied_rounds[r]
        return len(increments)

    async def run_round(self) -> RoundReport:
        cfg = self.config
        self.round += 1
        r = self.round
        self._last_good = self._round_start = self.global_model
        await asyncio.to_thread(self.trainer.set_flat_, self._round_start)
        loss = await asyncio.to_thread(self.local_training, cfg.task.local_steps)
        x = await asyncio.to_thread(self.trainer.get_flat)
        if not torch.isfinite(x).all():
            x = await self._recover_from_divergence(loss)  # G: nothing of this round's training is sent
        payload = await asyncio.to_thread(self.compress, x, r)
        request = self._seal(KIND_INCREMENT, payload)
        peers = self._targets()
        acked = await asyncio.gather(*(self._push(p, request) for p in peers))
        self.payload_bytes_sent += len(payload) * sum(acked)
        await self._await_round(r, {p.peer_id for p, ok in zip(peers, acked, strict=True) if ok})
        m = self.apply_round(r)
        await asyncio.to_thread(self.trainer.set_flat_, self.global_model)
        report = RoundReport(round=r, train_loss=loss, peers_in_view=len(peers), pulled=m - 1,
                             pushed_to_us=m - 1)
        if r % cfg.task.eval_every == 0:
            report.test_accuracy, report.test_loss = await asyncio.to_thread(
                self.trainer.evaluate, cfg.task.eval_samples)
        return report

    def counters(self) -> dict[str, Any]:
        return {**super().counters(), "increments_late": self.increments_late,
                "increments_missing": self.increments_missing, "equivocations": self.equivocations,
                "increment_payload_bytes_sent": self.payload_bytes_sent,
                "global_digest": self.global_digest()}

    def global_digest(self) -> str:
        """The first 16 hex digits of SHA-256 over ``G``'s float32 bytes: equal on nodes that agree."""
        return hashlib.sha256(self.global_model.numpy().tobytes()).hexdigest()[:16]


def make_increments_node(config: NodeConfig, identity: Identity, trainer: LocalTrainer, transport: Transport,
                         membership: PeerView) -> IncrementsNode:
    """An :class:`IncrementsNode` (it merges by the plain mean; config validation refuses other defenses)."""
    from defenses.mean import Mean

    return IncrementsNode(config, identity, trainer, transport, membership, Mean())
