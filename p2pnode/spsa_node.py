"""``--mode spsa``: shared-seed SPSA gossip, one byte per projected gradient (DESIGN §4.5).

Every node runs zeroth-order SGD (MeZO, Malladi et al. 2023) on its own shard: for step ``t`` and
sample ``k`` it draws ``z = z(seed(origin, t, k))``, measures ``g = (ℓ(θ+εz) − ℓ(θ−εz)) / 2ε``, codes
``g`` in one byte (:func:`protocols.spsa.encode_scalar`) and applies the *decoded* value,
``θ ← θ − η ĝ z``. Nobody sends a model: every node applies every scalar of every origin, and since
``z`` is regenerated from the seed, a scalar is one byte on the wire ("Just One Byte", Zelikman et
al. 2023). Updates commute, so scalars may arrive late and in any order.

Dissemination: each round a node seals the codes of its round (``local_steps × k`` bytes) in one
origin-signed batch and runs push-pull anti-entropy with ``fanout`` random peers: a request carries
our summary (per origin, the contiguous prefix of steps we hold) and the batches the peer lacks by its
last summary we saw; the reply carries the batches we lack by ours. Batches are forwarded as the
origin sealed them, so a relay cannot forge or alter scalars; the :class:`~protocols.spsa.ScalarLog`
applies each scalar exactly once and bans an origin that signs two values for one seed
(equivocation). Decoded values are bounded by the code's range by construction.

Consistency: after the last round a node keeps exchanging for ``spsa.drain_rounds`` rounds without
producing, so that everything produced reaches everyone. Every ``spsa.probe_every`` rounds a request
carries a probe (16 fixed coordinates of the model): a peer with the same summary and nothing pending
compares it with its own; when they differ by more than ``spsa.tolerance`` the node resyncs — it
fetches the state (model, log, pending scalars) from up to 3 peers and adopts the one whose model is
nearest the coordinate-wise median of the three (a robust choice that keeps model and log consistent).
A node that joins a running swarm (``spsa.join``) does the same before its first round.

Threads: scalars are produced and applied in a worker thread while ``_idle`` is clear; everything else
(the log, the pending list, probes, state snapshots) lives on the event loop, and anything that reads
the model waits for ``_idle``, so a snapshot never sees a half-applied round. The exchange handler only
records received scalars; they are applied at the next round boundary.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
import torch

from defenses import Aggregator
from p2pnode.config import NodeConfig
from p2pnode.errors import MessageRejected
from p2pnode.identity import Identity
from p2pnode.node import Node, PeerView, RoundReport
from p2pnode.outputs import MetricsWriter
from p2pnode.spsa import apply_scalar_, spsa_scalar
from p2pnode.trainer import LocalTrainer
from p2pnode.transport.base import Transport
from protocols.envelope import Envelope, unpack_limited
from protocols.errors import ProtocolError
from protocols.records import MembershipRecord
from protocols.spsa import (
    Equivocation,
    Holding,
    ScalarBatch,
    ScalarLog,
    SpsaError,
    decode_scalar,
    decode_summary,
    derive_seed,
    encode_scalar,
    encode_summary,
    open_batch,
    seal_batch,
)
from protocols.spsa_state import SpsaState, decode_state, encode_state

logger = logging.getLogger(__name__)

# envelope kinds are on the wire of every message, so they are two letters: SPSA gossip, SPSA state
KIND_GOSSIP, KIND_STATE = "sg", "ss"
PROBE_SIZE = 16
MAX_STEPS_PER_BATCH = 4096
MAX_BATCHES_PER_BODY = 1024  # every batch of a body is verified: this bounds what one message costs

LossFn = Callable[[torch.nn.Module, Any], Any]


def _probe_bytes(values: list[float] | None) -> bytes | None:
    """A probe on the wire: little-endian float32 (4 bytes per coordinate)."""
    return None if values is None else np.asarray(values, dtype="<f4").tobytes()


def probe_indices(numel: int, size: int = PROBE_SIZE) -> torch.Tensor:
    """The fixed coordinates a probe samples: the same on every node (seeded by ``numel``)."""
    g = torch.Generator().manual_seed(numel)
    return torch.randperm(numel, generator=g)[: min(size, numel)]


class SpsaNode(Node):
    """A node in ``--mode spsa`` (module docstring). ``loss_fn(model, (x, y))`` is the SPSA loss;
    ``eval_loss(model)`` the held-out loss reported at evaluations (default: the trainer's)."""

    role = "honest"

    @staticmethod
    def first_seq() -> int:
        """1: SPSA counts every byte (a clock-based start costs ~5 B per message); an SPSA node does not
        resume from a checkpoint, and a restarted one joins under a new key (see README)."""
        return 1

    def __init__(self, config: NodeConfig, identity: Identity, trainer: LocalTrainer, transport: Transport,
                 membership: PeerView, aggregator: Aggregator, *, loss_fn: LossFn,
                 eval_loss: Callable[[torch.nn.Module], float] | None = None) -> None:
        super().__init__(config, identity, trainer, transport, membership, aggregator)
        s = config.spsa
        self.loss_fn, self.eval_loss = loss_fn, eval_loss
        self.log = ScalarLog(k=s.k, max_origins=s.max_origins)
        self.step = 0  # our next SPSA step
        # received, not yet applied; appended on the event loop, consumed by the worker thread (deque
        # append/popleft are atomic), so scalars that arrive while we produce are applied at the next step
        self.pending: deque[tuple[str, int, int, int]] = deque()
        self.peer_summaries: dict[str, dict[str, Holding]] = {}  # the last holdings each peer sent
        self._fresh: ScalarBatch | None = None  # our sealed batch of this round, pushed with requests
        self.peer_finished: dict[str, bool] = {}  # the peer said it produced its last scalar
        self.finished_producing = False
        self.scalars_produced = 0
        self.scalars_applied = 0
        self.equivocations = 0
        self.resyncs = 0
        self.probe_mismatches = 0
        self.state_bytes_sent = 0  # replies to state requests (joins, resyncs), part of bytes_sent
        # what the gossip bodies we sent held (the rest of bytes_sent: envelopes, framing, state replies)
        self.wire_counts = {"codes": 0, "batch_bytes": 0, "summary_bytes": 0, "probe_bytes": 0, "bodies": 0}
        self._idle = asyncio.Event()
        self._idle.set()
        self._probe_idx = probe_indices(trainer.num_params)
        self._max_batch = MAX_STEPS_PER_BATCH
        self._produce_rng = torch.Generator().manual_seed(config.seed * 7919 + config.task.shard)

    # -- producing and applying (worker thread) -----------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trainer
        idx = torch.randint(len(t.train_y), (t.batch_size,), generator=self._produce_rng)
        return t.train_x[idx.to(t.train_x.device)], t.train_y[idx.to(t.train_y.device)]

    def produce(self, steps: int) -> tuple[float, ScalarBatch]:
        """``steps`` SPSA steps of ``k`` scalars on our shard, applied as decoded; returns the mean
        ``|g|`` and the batch of their codes. Scalars received meanwhile are applied between steps (the
        sooner a node sees its peers' scalars, the less stale its own are)."""
        s, me = self.config.spsa, self.identity.peer_id
        codes = bytearray()
        total = 0.0
        model = self.trainer.model
        start = self.step
        for t in range(start, start + steps):
            if self.pending:
                self._apply_received()
            for k in range(s.k):
                seed = derive_seed(me, t, k)
                g = spsa_scalar(model, self.loss_fn, self._batch(), seed, s.eps)
                code = encode_scalar(g)
                apply_scalar_(model, seed, decode_scalar(code), s.lr)
                codes.append(code)
                total += abs(g)
        self.step = start + steps
        self.scalars_produced += len(codes)
        self.scalars_applied += len(codes)
        return total / max(1, len(codes)), ScalarBatch(origin=me, start=start, k=s.k, codes=bytes(codes))

    def _apply_received(self) -> None:
        """Apply every received scalar queued now (worker thread)."""
        todo = []
        while self.pending:
            todo.append(self.pending.popleft())
        self._apply(todo)
        self.scalars_applied += len(todo)

    def _apply(self, todo: list[tuple[str, int, int, int]]) -> None:
        lr = self.config.spsa.lr
        for origin, step, k, code in todo:
            apply_scalar_(self.trainer.model, derive_seed(origin, step, k), decode_scalar(code), lr)

    async def _busy(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` (which changes or reads the model) in a worker thread with ``_idle`` cleared."""
        await self._idle.wait()
        self._idle.clear()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self._idle.set()

    async def apply_pending(self) -> int:
        """Apply the received scalars not applied yet; returns how many."""
        before = self.scalars_applied
        await self._busy(self._apply_received)
        return self.scalars_applied - before

    def probe(self) -> list[float] | None:
        """The model at the probe coordinates, or None while the model is changing."""
        if not self._idle.is_set():
            return None
        return self.trainer.get_flat()[self._probe_idx].tolist()

    # -- wire --------------------------------------------------------------------------------------
    def _gossip_body(self, peer: str, probe: bool, *, request: bool, summary: bool = True) -> bytes:
        """A request pushes only our batch of this round (nobody else can have it yet) and always carries
        our summary; a reply carries everything the requester lacks by the summary it just sent, and our
        summary only when the requester needs it (it probes, or it is draining). Anything older spreads by
        those pulls: pushing on a summary seen rounds ago mostly sends duplicates."""
        if request:
            batches = [self._fresh] if self._fresh is not None else []
        else:
            batches = self.log.missing_for(self.peer_summaries.get(peer, {}), max_steps=self._max_batch)
        signed = [b for b in batches if b.sealed is not None][:MAX_BATCHES_PER_BODY]  # the rest: next reply
        sealed = [raw for b in signed if (raw := b.sealed) is not None]
        summary_raw = encode_summary(self.log.holdings()) if summary else b""
        probe_raw = _probe_bytes(self.probe()) if probe and not self.pending else None
        w = self.wire_counts
        w["codes"] += sum(len(b.codes) for b in signed)
        w["batch_bytes"] += sum(map(len, sealed))
        w["summary_bytes"] += len(summary_raw)
        w["probe_bytes"] += len(probe_raw or b"")
        w["bodies"] += 1
        body = [summary_raw, sealed, probe_raw, self.finished_producing]
        return msgpack.packb(body, use_bin_type=True)

    def _take(self, sender: str, env: Envelope) -> tuple[dict[str, Holding] | None, list[float] | None]:
        """Record the batches of a verified gossip envelope; return the sender's summary (None if it
        sent none) and probe."""
        body = unpack_limited(env.payload, max_bin=self._max_bytes, max_array=max(4, MAX_BATCHES_PER_BODY))
        if not (isinstance(body, list) and len(body) == 4 and isinstance(body[0], bytes)
                and isinstance(body[1], list) and (body[2] is None or isinstance(body[2], bytes))
                and isinstance(body[3], bool)):
            raise ProtocolError("spsa gossip body must be [summary, [batches], probe | nil, finished]")
        max_origins = self.config.spsa.max_origins
        summary = self.log.resolve(decode_summary(body[0], max_origins=max_origins)) if body[0] else None
        probe = None
        if body[2] is not None:
            if len(body[2]) != 4 * len(self._probe_idx):
                raise ProtocolError(f"probe must be {4 * len(self._probe_idx)} bytes of float32")
            raw = np.frombuffer(body[2], dtype="<f4")
            with np.errstate(invalid="ignore"):  # a signalling NaN's class is read, not cast
                finite = bool(np.isfinite(raw).all())
            if not finite:
                raise ProtocolError("probe holds NaN or Inf")
            probe = raw.astype(np.float64).tolist()
        s = self.config.spsa
        for raw in body[1]:
            if not isinstance(raw, bytes):
                raise ProtocolError("batches must be bytes")
            try:
                batch = open_batch(raw, swarm=self.config.network.swarm, max_steps=self._max_batch, max_k=s.k)
                self.pending.extend(self.log.add(batch))
            except Equivocation as exc:
                self.equivocations += 1
                logger.warning("origin %s equivocated (%s): banned", exc.args[0] if exc.args else "?", exc)
            except SpsaError as exc:  # a bad or refused batch costs only itself
                self._reject(sender, exc)
        if summary is not None:
            self.peer_summaries[sender] = summary
        self.peer_finished[sender] = body[3]
        return summary, probe

    def _check_probe(self, peer: str, summary: dict[str, Holding] | None, probe: list[float] | None) -> bool:
        """True if the peer's probe disagrees with us beyond the tolerance (same holdings, none pending)."""
        ours = self.probe()
        if probe is None or ours is None or summary is None or self.pending or summary != self.log.holdings():
            return False
        diff = float(np.max(np.abs(np.asarray(probe) - np.asarray(ours))))
        if diff > self.config.spsa.tolerance:
            self.probe_mismatches += 1
            logger.warning("model of %s differs from ours by %.3g on the probe (same scalars)", peer, diff)
            return True
        return False

    async def serve(self, sender: str, request: bytes) -> bytes:
        """Transport handler: gossip (summary + batches, answered likewise) or a state request."""
        try:
            env = self._open_from(sender, request, (KIND_GOSSIP, KIND_STATE))
            if env.kind == KIND_STATE:
                await self._idle.wait()
                reply = self._seal(KIND_STATE, self._state_payload())  # no await in between: consistent
                self.state_bytes_sent += len(reply)
                return reply
            summary, probe = self._take(sender, env)
        except ProtocolError as exc:
            self._reject(sender, exc)
            raise MessageRejected(str(exc), peer=sender) from exc
        self.membership.mark_alive(sender)
        self._check_probe(sender, summary, probe)
        wants = probe is not None or self.peer_finished.get(sender, False)
        return self._seal(KIND_GOSSIP, self._gossip_body(sender, probe=probe is not None, request=False,
                                                         summary=wants))

    async def _gossip_with(self, peer: MembershipRecord, probe: bool) -> bool:
        """One push-pull exchange; True if the peer's probe says we diverged."""
        reply = await self._request(peer, self._seal(KIND_GOSSIP, self._gossip_body(peer.peer_id, probe,
                                                                                    request=True)))
        if reply is None:
            return False
        try:
            env = self._open_from(peer.peer_id, reply, (KIND_GOSSIP,))
            summary, their_probe = self._take(peer.peer_id, env)
        except ProtocolError as exc:
            self._reject(peer.peer_id, exc)
            return False
        return self._check_probe(peer.peer_id, summary, their_probe)

    # -- state transfer (join and resync) ------------------------------------------------------------
    def _state_payload(self) -> bytes:
        """Model, log, pending scalars and our step; call only while idle (a consistent snapshot)."""
        return encode_state(self.trainer.get_flat(), self.log, self.pending, step=self.step,
                            fingerprint=self.fingerprint, round=self.round)

    async def fetch_state(self, peers: Sequence[MembershipRecord]) -> bool:
        """Adopt the state of the peer nearest the median of up to 3 peers' models; False if none replied."""
        states: list[tuple[str, SpsaState]] = []
        for peer in peers[:3]:
            reply = await self._request(peer, self._seal(KIND_STATE, b""))
            if reply is None:
                continue
            try:  # every part is checked here: a lying donor costs its own state, nothing else
                env = self._open_from(peer.peer_id, reply, (KIND_STATE,))
                state = decode_state(env.payload, max_bytes=self._max_bytes, numel=self.trainer.num_params,
                                     fingerprint=self.fingerprint, k=self.config.spsa.k,
                                     max_origins=self.config.spsa.max_origins)
                states.append((peer.peer_id, state))
            except ProtocolError as exc:
                self._reject(peer.peer_id, exc)
        if not states:
            return False
        models = torch.stack([s.flat for _, s in states])
        center = models.median(dim=0).values
        best = min(range(len(states)), key=lambda i: float((models[i] - center).norm()))
        source, state = states[best]
        await self._idle.wait()
        self.trainer.set_flat_(state.flat)  # no await from here on: the switch is atomic for the handlers
        own = self.log.summary().get(self.identity.peer_id, -1)
        self.log, self.pending = state.log, deque(state.pending)
        self.step = max(self.step, own + 1, state.log.summary().get(self.identity.peer_id, -1) + 1)
        self.resyncs += 1
        logger.info("adopted the state of %s (%d scalars pending)", source, len(state.pending))
        return True

    # -- rounds ------------------------------------------------------------------------------------
    async def run_round(self, *, produce: bool = True) -> RoundReport:
        cfg = self.config
        self.round += 1
        if self.round == 1 and cfg.spsa.join:
            await self.fetch_state(self.membership.sample(3))
        g_mean, self._fresh = 0.0, None
        if produce:
            g_mean, batch = await self._busy(self.produce, cfg.task.local_steps)
            sealed = seal_batch(self.identity, batch, swarm=cfg.network.swarm)
            self._fresh = ScalarBatch(origin=batch.origin, start=batch.start, k=batch.k, codes=batch.codes,
                                      sealed=sealed)
            self.log.add(self._fresh)
        probe = cfg.spsa.probe_every > 0 and self.round % cfg.spsa.probe_every == 0
        peers = self.membership.sample(cfg.gossip.fanout)
        diverged = await asyncio.gather(*(self._gossip_with(p, probe) for p in peers))
        applied = await self.apply_pending()
        if any(diverged) and await self.fetch_state(self.membership.sample(3)):
            await self.apply_pending()
        report = RoundReport(round=self.round, train_loss=g_mean, peers_in_view=len(self.membership.live()),
                             pulled=applied, pushed_to_us=0)
        if self.round % cfg.task.eval_every == 0:
            report.test_accuracy, report.test_loss = await self._busy(self.evaluate)
        return report

    def evaluate(self) -> tuple[float, float]:
        accuracy, loss = self.trainer.evaluate(self.config.task.eval_samples)
        if self.eval_loss is not None:
            loss = self.eval_loss(self.trainer.model)
        return accuracy, loss

    def counters(self) -> dict[str, Any]:
        return {**super().counters(), "scalars_produced": self.scalars_produced,
                "scalars_applied": self.scalars_applied, "equivocations": self.equivocations,
                "spsa_resyncs": self.resyncs, "probe_mismatches": self.probe_mismatches}

    def _holds(self, peer: str, ours: dict[str, Holding]) -> bool:
        """The peer said it finished producing and its last summary equals ``ours``."""
        return self.peer_finished.get(peer, False) and self.peer_summaries.get(peer) == ours

    def settled(self) -> bool:
        """Every live peer has produced its last scalar and holds exactly the scalars we hold."""
        ours, live = self.log.holdings(), self.membership.live()
        return not self.pending and all(self.peer_finished.get(p.peer_id, False)
                                        and self.peer_summaries.get(p.peer_id) == ours for p in live)

    async def _write_round(self, metrics: MetricsWriter, r: RoundReport) -> None:
        metrics.write("round", **self.counters(), round=r.round, train_loss=r.train_loss,
                      test_accuracy=r.test_accuracy, test_loss=r.test_loss, peers_in_view=r.peers_in_view,
                      pulled=r.pulled, pushed_to_us=0)
        logger.info("round %d: %d scalars produced, %d applied, loss %s", r.round, self.scalars_produced,
                    self.scalars_applied, r.test_loss)

    async def drain(self, metrics: MetricsWriter | None = None) -> None:
        """After our last scalar: exchange with every live peer (no producing) until :meth:`settled`, for
        at most ``spsa.drain_rounds`` rounds, half a second apart."""
        self.finished_producing, self._fresh = True, None
        for _ in range(self.config.spsa.drain_rounds):
            self.round += 1
            ours = self.log.holdings()
            peers = [p for p in self.membership.live() if not self._holds(p.peer_id, ours)]
            await asyncio.gather(*(self._gossip_with(p, probe=False) for p in peers))
            applied = await self.apply_pending()
            if metrics is not None:
                await self._write_round(metrics, RoundReport(round=self.round, train_loss=0.0, pulled=applied,
                                                             peers_in_view=len(peers), pushed_to_us=0))
            if self.settled():
                return
            await asyncio.sleep(0.5)
        logger.warning("stopped draining after %d rounds without every peer holding every scalar",
                       self.config.spsa.drain_rounds)

    async def run_rounds(self, metrics: MetricsWriter) -> dict[str, Any]:
        """The configured rounds, then :meth:`drain`; return the final evaluation."""
        total = self.config.gossip.rounds
        while total == 0 or self.round < total:
            await self._unpaused.wait()
            await self._write_round(metrics, await self.run_round())
        await self.drain(metrics)
        accuracy, loss = await self._busy(self.evaluate)
        return metrics.write("final", **self.counters(), rounds=self.round, round=self.round,
                             test_accuracy=accuracy, test_loss=loss, probe=self.probe(),
                             summary=self.log.summary())



def default_spsa_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of ``model(x)`` against ``y``: the loss of the classification tasks."""
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def make_spsa_node(config: NodeConfig, identity: Identity, trainer: LocalTrainer, transport: Transport,
                   membership: PeerView, task: Any) -> SpsaNode:
    """An :class:`SpsaNode` with the task's SPSA loss (``task.spsa_loss(model, batch)`` if it has one)
    and held-out loss (``task.held_out_loss(model, x, y)``, evaluated on the trainer's test split)."""
    from defenses.mean import Mean

    loss_fn = getattr(task, "spsa_loss", None) or default_spsa_loss
    held_out = getattr(task, "held_out_loss", None)
    eval_loss = None
    if held_out is not None:
        n = config.task.eval_samples

        def eval_loss(model: torch.nn.Module) -> float:
            return float(held_out(model, trainer.test_x[:n], trainer.test_y[:n]))

    return SpsaNode(config, identity, trainer, transport, membership, Mean(), loss_fn=loss_fn,
                    eval_loss=eval_loss)
