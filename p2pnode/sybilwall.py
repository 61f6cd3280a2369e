"""SybilWall's gossip of origin-signed peer records (DESIGN §4.2), as the Node's gossip extension.

Every model message carries an attachment ``msgpack([own: bin | nil, relayed: bin | nil])`` of
:mod:`protocols.sybil_records` records:

- ``own``: the sender's own history ``h_i`` (hop 0), signed by the sender. DESIGN §4.2 never gossips a
  node's own record (``p ≠ i``), but with origin-signed records nobody else can create it, so a node
  announces it to each neighbour itself — at most once every ``announce_every`` of its rounds, to keep
  the bytes down; the neighbour stores it at distance 1 and relays it from there.
- ``relayed``: exactly as DESIGN §4.2: one known record ``p`` with ``p ≠ q`` (the receiver) and ``p`` not
  received from ``q``, drawn with ``P(p) ∝ λ e^{−λ(d_p − 1)}``; the receiver stores it at ``d_p + 1``.

A stored record is replaced only by one of a newer (signed) round. The table keeps ``max_records``
origins, least recently updated evicted; it is soft state (refilled by gossip after a restart), so only
the node's own history is in :meth:`SybilWallExtension.state_dict`.

What ``h_i`` is: with ``start`` given to ``note_own_model`` (the node always gives it), the sum of this
node's own local-training updates ``Σ_t (m_i(t) − start_i(t))`` — what it adds to the models it
receives, the counterpart of the relative histories its neighbours observe (see
:mod:`defenses.sybilwall`). Without ``start``: the sum of the updates of the models this node *sent*,
i.e. with the swarm's common initial model ``base``, ``m_i − θ_0`` (the ``absolute`` histories). The
aggregator always prefers its own observation of a direct neighbour to that neighbour's self-signed
record. Known limits: a relay may lie about the (unsigned) hop, which only skews forwarding; an origin
may sign any history it likes for itself — a direct neighbour could cross-check it against ``m − θ_0``
of the same round, which this extension does not do because it never sees the models.
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from defenses.sybilwall import History, observe_model
from protocols.envelope import unpack_limited
from protocols.errors import ProtocolError, TooLarge
from protocols.keys import Signer
from protocols.sybil_records import (
    MAX_HOP,
    SybilRecord,
    pack_sybil_record,
    record_max_bytes,
    relay_sybil_record,
    unpack_sybil_record,
)

logger = logging.getLogger(__name__)

_ATTACHMENT_OVERHEAD = 16


@dataclass(slots=True)
class KnownRecord:
    """A verified record of another peer: ``hop`` is our distance to its origin (1 = direct neighbour)."""

    record: SybilRecord
    hop: int
    received_from: str


def gossip_weight(hop: int, lam: float) -> float:
    """Unnormalised probability ``λ e^{−λ(d − 1)}`` of relaying a record known at distance ``hop``."""
    return lam * math.exp(-lam * (hop - 1))


def choose_record(candidates: Sequence[tuple[str, int]], *, rng: random.Random, lam: float) -> str | None:
    """Draw one origin from ``(origin, hop)`` pairs with ``P ∝ λ e^{−λ(hop − 1)}``; ``None`` if empty."""
    if not candidates:
        return None
    origins = [origin for origin, _ in candidates]
    return rng.choices(origins, weights=[gossip_weight(hop, lam) for _, hop in candidates])[0]


class SybilWallExtension:
    """Holds this node's own history and the table of gossiped records (a ``GossipExtension``).

    Parameters
    ----------
    identity
        Signs this node's own record; its ``peer_id`` is the record's origin.
    numel
        Number of model parameters (every record's history has exactly this length).
    rng
        Source of the relayed-record draw (seeded by the node, so runs are reproducible).
    lam
        λ of the hop-distance distribution.
    max_records
        Most origins kept in the records table (and neighbours in the announce table).
    base
        The swarm's common initial model ``(numel,)``, if known (see :mod:`defenses.sybilwall`).
    announce_every
        Our own record goes to a neighbour at most once every this many of our rounds.
    """

    def __init__(self, identity: Signer, *, numel: int, rng: random.Random, lam: float = 0.8,
                 max_records: int = 1024, base: torch.Tensor | None = None, announce_every: int = 5) -> None:
        if numel < 1 or lam <= 0 or max_records < 1 or announce_every < 1:
            raise ValueError("need numel >= 1, lam > 0, max_records >= 1 and announce_every >= 1")
        if base is not None and base.shape != (numel,):
            raise ValueError(f"base must have shape ({numel},), got {tuple(base.shape)}")
        self.identity = identity
        self.peer_id = identity.peer_id
        self.numel = numel
        self.rng = rng
        self.lam = lam
        self.max_records = max_records
        self.base = None if base is None else base.detach().to("cpu", torch.float32).clone()
        self.announce_every = announce_every
        self.own: History | None = None
        self._own_packed: bytes | None = None  # our signed record for self.own (built lazily)
        self._announced: OrderedDict[str, int] = OrderedDict()  # neighbour → own round last sent to it
        self._records: OrderedDict[str, KnownRecord] = OrderedDict()

    @property
    def records(self) -> Mapping[str, KnownRecord]:
        """The gossiped records table, origin → entry (read-only view)."""
        return self._records

    # -- own history --------------------------------------------------------------------------------
    def note_own_model(self, flat: torch.Tensor, *, round: int, start: torch.Tensor | None = None) -> None:
        """Account the model this node sends in ``round`` (call once per round, before the exchange);
        ``start`` is the model this round's local training started from (see the module docstring)."""
        if flat.shape != (self.numel,) or (start is not None and start.shape != flat.shape):
            raise ValueError(f"own model must have shape ({self.numel},), got {tuple(flat.shape)}")
        model = flat.detach().to("cpu", torch.float32)
        own = None if start is None else start.detach().to("cpu", torch.float32)
        self.own = observe_model(self.own, model, base=self.base, round=round, own=own)
        self._own_packed = None

    def _own_record(self) -> bytes | None:
        if self.own is None:
            return None
        if self._own_packed is None:
            try:
                self._own_packed = pack_sybil_record(self.identity, origin=self.peer_id, round=self.own.round,
                                                     hop=0, history=self.own.h)
            except ValueError as exc:  # e.g. a history beyond fp16 range: send none this round
                logger.warning("cannot sign our sybilwall record for round %d: %s", self.own.round, exc)
                self._own_packed = b""
        return self._own_packed or None

    def _announce_to(self, peer_id: str) -> bytes | None:
        own = self._own_record()
        if own is None or self.own is None:
            return None
        last = self._announced.get(peer_id)
        if last is not None and self.own.round - last < self.announce_every:
            return None
        self._announced.pop(peer_id, None)
        self._announced[peer_id] = self.own.round
        while len(self._announced) > self.max_records:
            self._announced.popitem(last=False)
        return own

    # -- GossipExtension -----------------------------------------------------------------------------
    def attach(self, peer_id: str, round: int) -> bytes | None:
        """Our own record (when due) and one relayed record for ``peer_id``; ``None`` if neither."""
        own = self._announce_to(peer_id)
        relayed = self._relay_to(peer_id)
        if own is None and relayed is None:
            return None
        return msgpack.packb([own, relayed], use_bin_type=True)

    def _relay_to(self, peer_id: str) -> bytes | None:
        candidates = [(origin, known.hop) for origin, known in self._records.items()
                      if origin != peer_id and known.received_from != peer_id]
        origin = choose_record(candidates, rng=self.rng, lam=self.lam)
        if origin is None:
            return None
        known = self._records[origin]
        return relay_sybil_record(known.record, hop=known.hop)

    def receive(self, sender: str, data: bytes) -> None:
        """Verify and store what ``sender`` attached; ProtocolError (storing nothing) if any part is bad."""
        one = record_max_bytes(self.numel)
        limit = 2 * one + _ATTACHMENT_OVERHEAD
        if len(data) > limit:
            raise TooLarge(f"sybilwall attachment of {len(data)} bytes exceeds {limit}")
        body = unpack_limited(bytes(data), max_bin=one, max_array=2)
        if not (isinstance(body, list) and len(body) == 2
                and all(part is None or isinstance(part, bytes) for part in body)):
            raise ProtocolError("sybilwall attachment must be [own: bin | nil, relayed: bin | nil]")
        own, relayed = (None if part is None else unpack_sybil_record(part, expected_numel=self.numel,
                                                                       max_bytes=one) for part in body)
        if own is not None and (own.hop != 0 or own.origin != sender):
            raise ProtocolError(f"own-record slot from {sender} holds {own.origin}'s record at hop {own.hop}")
        if relayed is not None and (relayed.hop == 0 or relayed.origin == sender):
            raise ProtocolError(f"relayed-record slot from {sender} holds {relayed.origin}'s record "
                                f"at hop {relayed.hop}")
        for record in (own, relayed):
            if record is not None:
                self._store(record, sender)

    def _store(self, record: SybilRecord, sender: str) -> None:
        if record.origin == self.peer_id:
            return
        known = self._records.get(record.origin)
        if known is not None and record.round <= known.record.round:
            return
        self._records.pop(record.origin, None)
        self._records[record.origin] = KnownRecord(record=record, hop=min(record.hop + 1, MAX_HOP),
                                                   received_from=sender)
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

    def extras(self) -> dict[str, Any]:
        """``{"records": origin → fp16 history (numel,), "base": initial model or None}`` for the merge."""
        return {"records": {origin: known.record.history() for origin, known in self._records.items()},
                "base": self.base}

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Our own history (the records table is soft state and is not saved)."""
        own = self.own
        return {"own_round": -1 if own is None else own.round,
                "own_h": torch.empty(0) if own is None else own.h.clone(),
                "own_prev": torch.empty(0) if own is None or own.prev is None else own.prev.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        rnd, h, prev = int(state["own_round"]), state["own_h"], state["own_prev"]
        if rnd < 0:
            self.own = None
        elif h.shape != (self.numel,) or prev.shape not in ((0,), (self.numel,)):
            raise ValueError(f"sybilwall own history must have {self.numel} elements")
        else:
            self.own = History(h=h.clone(), prev=prev.clone() if prev.numel() else None, round=rnd)
        self._own_packed = None
