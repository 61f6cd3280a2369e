"""One p2pnode daemon: local training plus push-pull gossip of full models.

Each round: H local SGD steps in a worker thread → sample k live peers from the DHT view → push our
model to each and pull theirs in the reply → merge own + pulled + models pushed to us since the last
merge through the configured aggregator → apply the merge *as a delta*, ``θ ← θ + (merged − θ_sent)``,
so anything the trainer did meanwhile is kept.

Every message is a signed envelope (:mod:`protocols.envelope`) around a checked model payload
(:mod:`protocols.model`); a message that fails any check is rejected, counted, and costs us nothing
else. The event loop never trains: heartbeats and incoming exchanges keep being answered.

The process around a node (DHT, transport, signals, checkpoints) is :mod:`p2pnode.runtime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from defenses import Aggregator, Layer, MergeContext
from defenses.bristle import Bristle
from p2pnode.config import NodeConfig
from p2pnode.errors import (
    MessageRejected,
    P2PNodeError,
    PeerUnreachable,
)
from p2pnode.identity import Identity
from p2pnode.outputs import MetricsWriter
from p2pnode.peerguard import PeerGuard, guard_limits, reason_of
from p2pnode.stragglers import StragglerCutoff, timed, wait_for_replies
from p2pnode.sync import RoundSnapshots
from p2pnode.trainer import LocalTrainer, spec_fingerprint
from p2pnode.transport.base import Transport
from p2pnode.wire import ModelWire, Received
from protocols.codecs import Layout
from protocols.envelope import Envelope, ReplayGuard, open_envelope, seal
from protocols.errors import ProtocolError
from protocols.exchange import pack_exchange, unpack_exchange
from protocols.model import decode_model, encode_model
from protocols.records import MembershipRecord
from protocols.replicas import Outgoing

logger = logging.getLogger(__name__)

KIND_PUSH, KIND_PULL = "push", "pull"
KIND_JOIN_REQUEST, KIND_JOIN_STATE = "jreq", "jstate"  # a joiner asks a donor for its current model
KIND_PING, KIND_PONG = "ping", "pong"  # liveness: an empty signed request, answered with our round (no model)


class PeerView(Protocol):
    """What the round loop needs from membership (:class:`p2pnode.membership.Membership` in the daemon)."""

    rejected: int

    def live(self) -> list[MembershipRecord]: ...
    def sample(self, k: int) -> list[MembershipRecord]: ...
    def mark_unreachable(self, peer_id: str) -> None: ...
    def mark_alive(self, peer_id: str) -> None: ...
    async def refresh(self) -> list[MembershipRecord]: ...
    async def run(self, state: Callable[[], tuple[int, bytes]],
                  ready: asyncio.Event | None = None) -> None: ...


class GossipExtension(Protocol):
    """Side information a defense gossips along with the models (e.g. SybilWall's peer records).

    ``attach`` returns the bytes to send to ``peer_id`` with our model (or ``None``); ``receive`` takes
    what ``sender`` attached (already inside a verified envelope) and raises ``ProtocolError`` if it is
    bad; ``extras`` is what the aggregator sees as ``MergeContext.extras`` at the next merge.
    """

    def attach(self, peer_id: str, round: int) -> bytes | None: ...
    def receive(self, sender: str, data: bytes) -> None: ...
    def extras(self) -> dict[str, Any]: ...
    def note_own_model(self, flat: torch.Tensor, *, round: int,
                       start: torch.Tensor | None = None) -> None: ...


def build_extension(config: NodeConfig, identity: Identity, trainer: LocalTrainer) -> GossipExtension | None:
    """The gossip extension the configured defense needs (SybilWall's record gossip), or None.

    Call it on the freshly built trainer: SybilWall measures every history from the common initial model.
    """
    if config.gossip.defense.partition(":")[0] != "sybilwall":
        return None
    from p2pnode.sybilwall import SybilWallExtension

    return SybilWallExtension(identity, numel=trainer.num_params,
                              rng=random.Random(f"{config.seed}/{identity.peer_id}/sybilwall"),
                              base=trainer.get_flat())


def model_layers(model: torch.nn.Module) -> list[Layer]:
    """The float tensors of ``model`` in flat-vector order (see ``p2pnode.trainer.flatten_state``)."""
    params = {id(p) for p in model.parameters()}
    layers, offset = [], 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        layers.append(Layer(name=name, offset=offset, shape=tuple(tensor.shape),
                            is_buffer=id(tensor) not in params))
        offset += tensor.numel()
    return layers


def probe_index(layers: Sequence[Layer], count: int) -> torch.Tensor | None:
    """``count`` fixed coordinates of the flat model, the same on every node (seeded by the layout only)."""
    numel = sum(la.numel for la in layers)
    if count <= 0 or numel == 0:
        return None
    gen = torch.Generator().manual_seed(0x9E3779B9 ^ numel)
    return torch.randperm(numel, generator=gen)[: min(count, numel)].sort().values


class Inbox:
    """Models pushed to us since the last merge: the latest one per peer, at most ``capacity`` peers, each
    with the round its sender was in (the envelope's; 0 when not known)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._models: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()

    def put(self, peer_id: str, flat: torch.Tensor, round: int = 0) -> None:
        self._models.pop(peer_id, None)
        self._models[peer_id] = (flat, round)
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)

    def drain(self) -> dict[str, torch.Tensor]:
        return {peer: flat for peer, (flat, _) in self.drain_with_rounds().items()}

    def drain_with_rounds(self) -> dict[str, tuple[torch.Tensor, int]]:
        models, self._models = dict(self._models), OrderedDict()
        return models

    def __len__(self) -> int:
        return len(self._models)


@dataclass(slots=True)
class RoundReport:
    """What one round did (also the body of a metrics line)."""

    round: int
    train_loss: float
    peers_in_view: int
    pulled: int
    pushed_to_us: int
    test_accuracy: float | None = None
    test_loss: float | None = None
    exchange_s: float | None = None  # time this round waited on its exchange with peers
    train_s: float | None = None  # wall time of the local_training call whose model this round sent


class Node:
    """The round loop and the exchange handler of one node.

    Parameters
    ----------
    config
        The node's configuration.
    identity
        Signs every envelope; its peer id is the transport's.
    trainer
        Owns the model; trained in a worker thread.
    transport
        Carries exchanges (the real libp2p one, or the in-memory one in tests).
    membership
        Live view of the swarm and peer sampling.
    aggregator
        Merge rule.
    """

    role = "honest"

    def __init__(self, config: NodeConfig, identity: Identity, trainer: LocalTrainer, transport: Transport,
                 membership: PeerView, aggregator: Aggregator, extension: GossipExtension | None = None,
                 ) -> None:
        self.config = config
        self.identity = identity
        self.trainer = trainer
        self.transport = transport
        self.membership = membership
        self.aggregator = aggregator
        self.extension = extension
        self.merge_state = aggregator.new_state()
        self.layers = model_layers(trainer.model)
        self.class_f1: Any = None
        rule = getattr(aggregator, "inner", aggregator)  # unwrap the variance-correction post-step
        self._bristle = rule if isinstance(rule, Bristle) else None
        self._peer_rng = random.Random(f"{config.seed}/{identity.peer_id}/peers")
        if self._bristle is not None:  # Bristle scores peers by per-class F1 on a local validation split
            self.class_f1 = trainer.class_f1
            self.merge_state.class_counts = trainer.val_class_counts
        self.fingerprint = spec_fingerprint(trainer.model)
        layout = Layout(shapes=tuple(la.shape for la in self.layers))
        self.wire = ModelWire(config.gossip.codec, layout=layout, init=trainer.get_flat(),
                              spec_fingerprint=self.fingerprint,
                              capacity=config.gossip.codec_peers)
        self._next_training: asyncio.Future[tuple[float, float]] | None = None  # --overlap
        self._next_start: torch.Tensor | None = None
        self._inflight: set[str] = set()  # peers we have a request out to (compressed codecs: one at a time)
        self.inbox = Inbox(config.gossip.max_inbox)
        self.stragglers = StragglerCutoff(config.gossip.straggler_factor, config.gossip.straggler_min_s)
        self.snapshots = RoundSnapshots() if config.gossip.sync else None  # --sync (p2pnode/sync.py)
        self.round = 0
        self.messages_rejected = 0
        self.local_divergences = 0
        self._last_good = trainer.get_flat()
        self._seq = itertools.count(self.first_seq())
        self._push_guard = ReplayGuard()
        self._pull_guard = ReplayGuard()
        self.guard = PeerGuard(guard_limits(config.network))  # per-peer rate limits, score and bans
        transport.screen = self._screen  # runs on every request before its body is read
        self._max_bytes = config.network.max_message_bytes
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self.round_hooks: list[Callable[[], Awaitable[None]]] = []  # awaited after each round (checkpoints)
        self._probe_index = probe_index(self.layers, config.ops.probe_coords)
        self.join_donors_used = 0

    @staticmethod
    def first_seq() -> int:
        """First envelope sequence number: the clock in microseconds, so a restarted node (same key)
        continues above the numbers its peers' replay guards remember from its previous run."""
        return time.time_ns() // 1000

    # -- hooks (a Byzantine node overrides these; honest ones send what they have) ---------------------
    def outgoing_model(self, own: torch.Tensor) -> torch.Tensor:
        """The model this node sends; honest nodes send their own."""
        return own

    def observe(self, received: dict[str, torch.Tensor]) -> None:
        """Called with the models received in a round, before the merge; honest nodes ignore it."""

    def local_training(self, steps: int) -> float:
        """``steps`` local SGD steps on the own shard; returns their mean loss (runs in a worker thread)."""
        return self.trainer.train_steps(steps)

    def _timed_training(self, steps: int) -> tuple[float, float]:
        """:meth:`local_training` and its wall time in seconds (ended by the loss's ``.item()``)."""
        t0 = time.perf_counter()
        loss = self.local_training(steps)
        return loss, time.perf_counter() - t0

    # -- wire --------------------------------------------------------------------------------------
    def _seal_model(self, kind: str, flat: torch.Tensor, peer_id: str,
                    peer_ack: bytes | None = None) -> tuple[bytes, Outgoing | None]:
        model, pending = self.wire.encode(peer_id, self.outgoing_model(flat), round=self.round,
                                          peer_ack=peer_ack)
        attachment = self.extension.attach(peer_id, self.round) if self.extension is not None else None
        return self._seal(kind, pack_exchange(model, attachment)), pending

    def _seal(self, kind: str, payload: bytes) -> bytes:
        """Our signed envelope of ``kind`` around ``payload`` (this swarm, round, next sequence number)."""
        return seal(self.identity, kind=kind, swarm=self.config.network.swarm, round=self.round,
                    seq=next(self._seq), payload=payload)

    def _open_from(self, sender: str, data: bytes, kinds: tuple[str, ...]) -> Envelope:
        """Verify an envelope of one of ``kinds`` that must be signed by ``sender``; ProtocolError if not."""
        env = open_envelope(data, max_bytes=self._max_bytes, swarm=self.config.network.swarm, kinds=kinds)
        if env.sender != sender:
            raise ProtocolError(f"envelope signed by {env.sender}, but the connection is from {sender}")
        return env

    async def _request(self, peer: MembershipRecord, request: bytes) -> bytes | None:
        """Send ``request`` to ``peer`` and return its reply; None (logged, peer marked) if it failed."""
        try:
            return await self.transport.exchange(peer.peer_id, request, timeout=self.config.timeouts.exchange,
                                                 maddrs=peer.maddrs)
        except PeerUnreachable as exc:
            logger.info("peer %s unreachable: %s", peer.peer_id, exc)
            self.membership.mark_unreachable(peer.peer_id)
        except MessageRejected as exc:
            logger.info("exchange with %s refused: %s", peer.peer_id, exc)
        return None

    def _open_model(self, data: bytes, *, kind: str, sender: str, guard: ReplayGuard) -> Received:
        """Verify, replay-check and decode a model message from ``sender``; ProtocolError if bad."""
        return self._decode_model(self._open_from(sender, data, (kind,)), guard=guard)

    def _decode_model(self, env: Envelope, *, guard: ReplayGuard) -> Received:
        """Replay-check and decode a verified model envelope; ProtocolError if bad."""
        sender = env.sender
        guard.check(env)
        model, attachment = unpack_exchange(env.payload, max_bytes=self._max_bytes)
        received = self.wire.decode(sender, model)
        if attachment is not None:
            if self.extension is None:
                raise ProtocolError("unexpected attachment: this node runs no gossip extension")
            self.extension.receive(sender, attachment)
        return received

    def _reject(self, peer: str, exc: Exception) -> None:
        self.messages_rejected += 1
        self.guard.penalize(peer, reason_of(exc))
        logger.info("rejected message from %s: %s", peer, exc)

    def _screen(self, sender: str, size: int) -> str | None:
        """The transport's check of a request from its header: refused (and counted) if ``sender`` is
        banned, lacks the identity proof of work, or is over its request or byte rate."""
        refused = self.guard.admit(sender, size)
        if refused is None:
            return None
        self.messages_rejected += 1
        logger.debug("refused a request of %d bytes from %s: %s", size, sender, refused)
        return f"refused: {refused}"

    async def serve(self, sender: str, request: bytes) -> bytes:
        """Transport handler: keep a pushed model for the next merge and reply with ours."""
        if self.wire.compressed and sender in self._inflight and self.identity.peer_id < sender:
            # both ends pushed to each other at once; the larger id's request wins, so the edge's references
            # change in one exchange at a time (protocols/replicas.py)
            raise MessageRejected("busy: our own exchange with you is in flight", peer=sender)
        try:
            env = self._open_from(sender, request, (KIND_PUSH, KIND_JOIN_REQUEST, KIND_PING))
            if env.kind == KIND_PING:
                if env.payload:
                    raise ProtocolError(f"ping carries {len(env.payload)} payload bytes, expected none")
                self._push_guard.check(env)
                return self._seal(KIND_PONG, b"")  # the envelope itself carries our round
            if env.kind == KIND_JOIN_REQUEST:
                self._push_guard.check(env)
                return await self._serve_join(sender)
            received = self._decode_model(env, guard=self._push_guard)
        except ProtocolError as exc:
            self._reject(sender, exc)
            raise MessageRejected(str(exc), peer=sender) from exc
        self.membership.mark_alive(sender)
        own = None
        if self.snapshots is not None:  # --sync: our model of the pusher's round
            own = await self.snapshots.wait_for(env.round, self.config.timeouts.exchange)
        if own is None:
            own = await asyncio.to_thread(self.trainer.get_flat)
        reply, pending = self._seal_model(KIND_PULL, own, sender, peer_ack=received.ack)
        if pending is not None:
            self.wire.book.commit(pending)  # type: ignore[union-attr]
        if received.view is not None:
            self.inbox.put(sender, self.wire.keep(sender, received.view, own), env.round)
        return reply

    async def _exchange_one(self, peer: MembershipRecord, own: torch.Tensor) -> torch.Tensor | None:
        if self.guard.is_banned(peer.peer_id):
            return None  # a view that does not know our bans (in-process swarms, tests) may offer one
        request, pending = self._seal_model(KIND_PUSH, own, peer.peer_id)
        self._inflight.add(peer.peer_id)
        try:
            reply = await self._request(peer, request)
        finally:
            self._inflight.discard(peer.peer_id)
        if reply is None:
            return None
        try:
            received = self._open_model(reply, kind=KIND_PULL, sender=peer.peer_id, guard=self._pull_guard)
        except ProtocolError as exc:
            self._reject(peer.peer_id, exc)
            return None
        self.membership.mark_alive(peer.peer_id)  # it answered: it keeps a place in a flooded view
        if pending is not None:
            self.wire.book.settle_request(pending, received.ack or b"")  # type: ignore[union-attr]
        if received.view is None:
            return None
        return self.wire.keep(peer.peer_id, received.view, own)

    async def exchange(self, peers: Sequence[MembershipRecord], own: torch.Tensor) -> dict[str, torch.Tensor]:
        """Push ``own`` to every peer concurrently; return what they replied with (see ModelWire.keep) by the
        straggler cutoff (:mod:`p2pnode.stragglers`): a later reply goes to the inbox, for the next merge."""
        tasks = {p.peer_id: asyncio.ensure_future(timed(self.stragglers.record, self._exchange_one(p, own)))
                 for p in peers}
        # --sync: a late reply is a model of a round already merged, so it is dropped
        late = self.inbox.put if self.snapshots is None else (lambda peer, reply: None)
        replies = await wait_for_replies(tasks, self.stragglers.cutoff(), late)
        slow = [peer for peer, task in tasks.items() if not task.done()]
        if slow:
            self.stragglers.cut += len(slow)
            logger.info("round %d: went on without %d slow peer(s) %s", self.round, len(slow),
                        ", ".join(slow))
        return replies

    # -- rounds ------------------------------------------------------------------------------------
    async def wait_for_peers(self) -> None:
        """Before round 1, wait (bounded) until ``gossip.wait_peers`` peers are in view."""
        want, g = self.config.gossip.wait_peers, self.config.gossip
        if want <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + g.wait_peers_s
        while len(self.membership.live()) < want and loop.time() < deadline:
            with contextlib.suppress(TimeoutError, P2PNodeError):
                await self.membership.refresh()
            await asyncio.sleep(0.25)
        logger.info("starting with %d peers in view (wanted %d)", len(self.membership.live()), want)

    async def join_swarm(self) -> bool:
        """Start from the coordinate-wise median of ``gossip.join_donors`` running peers' models.

        Done once, before round 1, when the swarm is already running (some live peer is past round 0)
        and this node has no progress of its own (it did not resume from a checkpoint). The median of
        2f + 1 donors' models is inside the range of the honest ones when at most f donors lie, so one
        lying donor among three cannot poison the join; a donor that dies or answers garbage is skipped.
        Returns True when the model was replaced.
        """
        want = self.config.gossip.join_donors
        running = [p for p in self.membership.live() if p.round > 0]
        if want <= 0 or self.round > 0 or not running:
            return False
        donors = self._peer_rng.sample(running, min(want, len(running)))
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._fetch_state(p)) for p in donors]
        states = [s for t in tasks if (s := t.result()) is not None]
        if not states:
            logger.warning("join: none of %d donors answered; starting from the initial model", len(donors))
            return False
        stacked = torch.stack(states)
        merged = stacked.median(dim=0).values if len(states) > 2 else stacked.mean(dim=0)
        await asyncio.to_thread(self.trainer.set_flat_, merged)
        await asyncio.to_thread(self.trainer.reset_momentum)
        self._last_good = merged.clone()
        self.join_donors_used = len(states)
        logger.info("join: started from the %s of %d donors' models (%d asked)",
                    "median" if len(states) > 2 else "mean", len(states), len(donors))
        return True

    async def _fetch_state(self, peer: MembershipRecord) -> torch.Tensor | None:
        reply = await self._request(peer, self._seal(KIND_JOIN_REQUEST, b""))
        if reply is None:
            return None
        try:
            env = self._open_from(peer.peer_id, reply, (KIND_JOIN_STATE,))
            self._pull_guard.check(env)
            payload = decode_model(env.payload, expected_numel=self._last_good.numel(),
                                   fingerprint=self.fingerprint)
        except ProtocolError as exc:
            self._reject(peer.peer_id, exc)
            return None
        return payload.flat

    async def _serve_join(self, sender: str) -> bytes:
        """A joiner asked for our current model: send it whole (dense; the edge has no reference yet)."""
        own = await asyncio.to_thread(self.trainer.get_flat)
        body = encode_model(self.outgoing_model(own), fingerprint=self.fingerprint, round=self.round)
        logger.info("join: sent our model to %s", sender)
        return self._seal(KIND_JOIN_STATE, body)

    def model_probe(self) -> dict[str, Any]:
        """``{"probe": [...]}``: the model at the fixed probe coordinates (empty dict when off)."""
        if self._probe_index is None:
            return {}
        flat = self.trainer.get_flat()
        return {"probe": [round(float(v), 7) for v in flat[self._probe_index]]}

    async def run_round(self) -> RoundReport:
        """Train H steps, exchange with k sampled peers, merge, maybe evaluate."""
        cfg = self.config
        self.round += 1
        if self._next_training is not None:  # --overlap: these steps ran during the last exchange
            start, (loss, train_s) = self._next_start, await self._next_training
            self._next_training = None
        else:
            start = await asyncio.to_thread(self.trainer.get_flat) if self.extension is not None else None
            loss, train_s = await asyncio.to_thread(self._timed_training, cfg.task.local_steps)
        sent = await asyncio.to_thread(self.trainer.get_flat)
        if not torch.isfinite(sent).all():
            sent = await self._recover_from_divergence(loss)
        self._last_good = sent
        if self.snapshots is not None:
            self.snapshots.add(self.round, sent)
        if self.extension is not None:
            self.extension.note_own_model(sent, round=self.round, start=start)
        peers = self._pick_peers(sent, cfg.gossip.fanout)
        if cfg.gossip.overlap and (cfg.gossip.rounds == 0 or self.round < cfg.gossip.rounds):
            # the next round's local steps run while this exchange is in flight; the merge below lands
            # on the live model as a delta, so those steps are kept
            self._next_start = sent
            self._next_training = asyncio.ensure_future(
                asyncio.to_thread(self._timed_training, cfg.task.local_steps))
        waiting = time.monotonic()
        pulled = await self.exchange(peers, sent)
        waited = time.monotonic() - waiting
        if self.snapshots is None:
            pushed = self.inbox.drain()
        else:  # --sync: only the pushes of this round
            pushed = self._same_round(self.inbox.drain_with_rounds())
        received = self.wire.inputs(sent, {**pushed, **pulled})  # a pulled model is as fresh as a pushed one
        self.observe(received)
        if received:
            await self._merge(sent, received)
        report = RoundReport(round=self.round, train_loss=loss, peers_in_view=len(self.membership.live()),
                             pulled=len(pulled), pushed_to_us=len(pushed), exchange_s=round(waited, 4),
                             train_s=round(train_s, 4))
        if self.round % cfg.task.eval_every == 0:
            report.test_accuracy, report.test_loss = await asyncio.to_thread(
                self.trainer.evaluate, cfg.task.eval_samples)
        return report

    async def _recover_from_divergence(self, loss: float) -> torch.Tensor:
        """Local SGD produced NaN/Inf: go back to the last finite model and drop the momentum buffers.

        Without this, one diverged step leaves the node useless for good: its messages are rejected
        (non-finite payloads) and every later merge refuses its non-finite own input.
        """
        self.local_divergences += 1
        logger.error("round %d: local training diverged (loss %s); restoring the last finite model",
                     self.round, loss)
        await asyncio.to_thread(self.trainer.set_flat_, self._last_good)
        await asyncio.to_thread(self.trainer.reset_momentum)
        return self._last_good.clone()

    async def _merge(self, sent: torch.Tensor, received: dict[str, torch.Tensor]) -> None:
        """Merge through the defense and apply the result as a delta (progress made meanwhile is kept),
        scaled by the consensus step (``GossipConfig.merge_step``).

        A rule whose precondition this round's inputs do not meet (e.g. Krum with n <= 2F + 2 because few
        peers answered) raises ValueError: the node then keeps its own model for this round.
        """
        try:
            merged = await asyncio.to_thread(self.aggregator.aggregate, sent, received, self._merge_context())
        except ValueError as exc:
            logger.warning("round %d: kept own model, %s cannot merge %d inputs: %s", self.round,
                           self.config.gossip.defense, len(received) + 1, exc)
            return
        delta = merged - sent
        step = self.config.gossip.merge_step()
        await asyncio.to_thread(self.trainer.add_flat_, delta if step == 1.0 else step * delta)

    def _same_round(self, pushed: dict[str, tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        """--sync: the pushes of this round; one of a later round goes back to the inbox, older ones go."""
        now: dict[str, torch.Tensor] = {}
        for peer, (flat, r) in pushed.items():
            if r == self.round:
                now[peer] = flat
            elif r > self.round:
                self.inbox.put(peer, flat, r)
        return now

    def _pick_peers(self, own: torch.Tensor, k: int) -> list[MembershipRecord]:
        """k live peers: uniformly at random, or by Bristle's distance-based prioritizer; never one whose
        exchange from an earlier round is still running (a straggler's, see :mod:`p2pnode.stragglers`)."""
        busy = self._inflight
        if self._bristle is None:
            return [p for p in self.membership.sample(k + len(busy)) if p.peer_id not in busy][:k]
        live = [p for p in self.membership.live() if p.peer_id not in busy]
        chosen = set(self._bristle.select_peers(own, [p.peer_id for p in live], self.merge_state, k=k,
                                                rng=self._peer_rng))
        return [p for p in live if p.peer_id in chosen]

    def _merge_context(self) -> MergeContext:
        extras = self.extension.extras() if self.extension is not None else {}
        return MergeContext(round=self.round, layers=self.layers, state=self.merge_state,
                            class_f1=self.class_f1, extras=extras)

    def counters(self) -> dict[str, Any]:
        stats = self.transport.stats
        return {"peer_id": self.identity.peer_id, "role": self.role, "bytes_sent": stats.bytes_sent,
                "bytes_received": stats.bytes_received,
                "messages_rejected": (self.messages_rejected + self.membership.rejected
                                      + stats.frames_rejected),
                "peers_banned": self.guard.bans, "codec_resyncs": self.wire.resyncs,
                "exchanges_cut": self.stragglers.cut,
                "local_divergences": self.local_divergences}

    # -- operator control: between two rounds, a paused node waits (it still serves peers and heartbeats)
    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def pause(self) -> None:
        self._unpaused.clear()

    def resume(self) -> None:
        self._unpaused.set()

    async def run_rounds(self, metrics: MetricsWriter) -> dict[str, Any]:
        """Run the configured number of rounds (forever if 0); return the final evaluation."""
        total = self.config.gossip.rounds
        while total == 0 or self.round < total:
            await self._unpaused.wait()
            r = await self.run_round()
            metrics.write("round", **self.counters(), round=r.round, train_loss=r.train_loss,
                          test_accuracy=r.test_accuracy, test_loss=r.test_loss, peers_in_view=r.peers_in_view,
                          pulled=r.pulled, pushed_to_us=r.pushed_to_us, exchange_s=r.exchange_s,
                          train_s=r.train_s,
                          **self.model_probe())
            for hook in self.round_hooks:
                await hook()
            logger.info("round %d: loss %.4f, acc %s, %d peers in view, pulled %d, pushed to us %d",
                        r.round, r.train_loss, r.test_accuracy, r.peers_in_view, r.pulled, r.pushed_to_us)
        if self.snapshots is not None:
            self.snapshots.close()  # peers still waiting for a round we will not make get our live model
        accuracy, loss = await asyncio.to_thread(self.trainer.evaluate, None)
        return metrics.write("final", **self.counters(), rounds=self.round, round=self.round,
                             test_accuracy=accuracy, test_loss=loss, **self.defense_report())

    def defense_report(self) -> dict[str, Any]:
        """What the defense learned about its peers, for the final row (empty for most rules).

        SybilWall: ``peer_trust``, each peer's uniqueness (1 − the largest cosine of its history with
        another's) at the last merge that weighed it, near 0 for identities that move together; and the
        gossiped record table's size, ``sybil_records``, of which ``sybil_records_relayed`` came over
        more than one hop.
        """
        report: dict[str, Any] = {}
        trust = getattr(self.merge_state, "uniqueness", None)
        if isinstance(trust, dict) and trust:
            report["peer_trust"] = {peer: round(float(u), 4) for peer, u in trust.items()}
        records = getattr(self.extension, "records", None)
        if records is not None:
            report["sybil_records"] = len(records)
            report["sybil_records_relayed"] = sum(1 for known in records.values() if known.hop > 1)
        return report


def validation_fraction(config: NodeConfig) -> float:
    """Share of the shard held out for local validation: Bristle needs one, other defenses do not."""
    return 0.1 if config.gossip.defense.partition(":")[0] == Bristle.name else 0.0
