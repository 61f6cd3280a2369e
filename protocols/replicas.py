"""Per-edge references that keep compressed model exchange consistent (DESIGN §3).

Nodes hold different models, so a compressed *difference* needs a base both ends agree on. For every
directed edge ``i → j`` both ends keep the reference ``r_ij``: the last state of ``i`` that ``j`` has
reconstructed. ``i`` sends ``q = C(θ_i − r_ij)`` and both ends set ``r_ij ← r_ij + D(q)``, computed by
the same decode on both sides, so the two copies stay bit-identical; whatever ``C`` dropped stays in
``θ_i − r_ij`` and goes out later (error feedback for free). ``j``'s view of ``i`` is ``r_ij``.

Every message names the fingerprint (blake2b-128 of the fp32 bytes) of the reference it was encoded
against (``base``) and of the result (``new``), and acknowledges the reverse edge (``ack``: the
fingerprint of the reference the sender now holds of the receiver's stream). A receiver whose
reference differs refuses the difference; the sender then falls back to a full snapshot (the
``SNAPSHOT_CODEC`` encoding of ``θ_i``, which both ends decode identically). On first contact both ends
start from the swarm's common initial model (``init``) when they share it, so a fresh edge costs no
snapshot.

One exchange is a request ``i → j`` answered by ``j → i``. Lost messages are handled by keeping one
previous reference per edge:

- the requester commits its outgoing reference only when the reply acknowledges it (``ack == new``);
  a reply that never comes leaves ``i`` one step behind ``j``, and ``i``'s next ``base`` equals ``j``'s
  previous reference, to which ``j`` rolls back;
- the responder commits at once; if the reply is lost, the requester's next ``ack`` names the
  responder's previous reference, and the responder rolls back to it before encoding.

Concurrency: the book is synchronous and not thread-safe; the caller runs it on one event loop and
never lets two exchanges with the same peer overlap (the node answers ``busy`` to the peer with the
larger id, see :mod:`p2pnode.node`). The references live in an LRU of ``capacity`` peers; an evicted
peer falls back to a snapshot.

Wire (msgpack map; inside the signed envelope, so read only after the signature verified):
``{"v": 1, "fp": model spec fingerprint, "r": round, "c": codec spec, "base": 16 bytes | b"" (snapshot),
"new": 16 bytes, "ack": 16 bytes | b"", "data": codec payload}``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from protocols.codecs import Codec, CodecError, Layout, make_codec
from protocols.envelope import is_counter, unpack_limited
from protocols.errors import PayloadMismatch, ProtocolError
from protocols.records import MAX_FINGERPRINT_BYTES

VERSION = 1
FP_BYTES = 16
SNAPSHOT_CODEC = "fp16"
_KEYS = frozenset({"v", "fp", "r", "c", "base", "new", "ack", "data"})
_OVERHEAD = 512  # everything but data: keys, three fingerprints, the spec fingerprint, codec name, round


def ref_fingerprint(ref: torch.Tensor) -> bytes:
    """blake2b-128 of the fp32 bytes of a reference ``(d,)`` (CPU, contiguous)."""
    return hashlib.blake2b(ref.detach().contiguous().numpy().data.cast("B"), digest_size=FP_BYTES).digest()


class RefMismatch(ProtocolError):
    """The message was encoded against a reference this node does not hold (not necessarily hostile).

    ``ack`` is the message's acknowledgement of our own stream, still valid: the caller settles with it.
    """

    def __init__(self, message: str, *, ack: bytes = b"") -> None:
        super().__init__(message)
        self.ack = ack


@dataclass(slots=True)
class _Ref:
    cur: torch.Tensor
    cur_fp: bytes
    prev: torch.Tensor | None = None
    prev_fp: bytes = b""

    def commit(self, new: torch.Tensor, new_fp: bytes) -> None:
        self.prev, self.prev_fp = self.cur, self.cur_fp
        self.cur, self.cur_fp = new, new_fp

    def rollback(self) -> None:
        assert self.prev is not None
        self.cur, self.cur_fp = self.prev, self.prev_fp
        self.prev, self.prev_fp = None, b""


@dataclass(slots=True)
class _Edge:
    out: _Ref | None = None  # what the peer has reconstructed of us
    inc: _Ref | None = None  # what we have reconstructed of the peer
    state: Any = None  # the codec's per-stream encoder state (our stream to the peer)
    snapshot_next: bool = False  # the peer lost our stream: the next message is a snapshot


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An encoded message and what committing it changes (see :meth:`ReplicaBook.commit_request`)."""

    payload: bytes
    peer: str
    base_fp: bytes
    new: torch.Tensor = field(repr=False)
    new_fp: bytes = b""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A decoded message: the sender's reconstructed model and its acknowledgement of our stream."""

    view: torch.Tensor
    ack: bytes


class ReplicaBook:
    """The references of one node's edges (see the module docstring).

    Parameters
    ----------
    codec
        ``NAME[:ARGS]`` of :func:`protocols.codecs.make_codec`.
    layout
        The model's parameter shapes (PowerSGD and TernGrad work per tensor).
    init
        The swarm's common initial model ``(d,)`` fp32: the first reference of every edge.
    spec_fingerprint
        Names the model architecture; messages for another one are refused.
    capacity
        Peers whose references are kept (least recently used evicted).
    """

    def __init__(self, codec: str, layout: Layout, init: torch.Tensor, *, spec_fingerprint: bytes,
                 capacity: int = 32) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if init.shape != (layout.numel,):
            raise ValueError(f"init must have shape ({layout.numel},), got {tuple(init.shape)}")
        self.codec: Codec = make_codec(codec)
        self.snapshot_codec: Codec = make_codec(SNAPSHOT_CODEC)
        self.layout = layout
        self.init = init.detach().to("cpu", torch.float32).contiguous().clone()
        self.init_fp = ref_fingerprint(self.init)
        self.spec_fingerprint = bytes(spec_fingerprint)
        self.capacity = capacity
        self.snapshots_sent = 0
        self._edges: OrderedDict[str, _Edge] = OrderedDict()
        # largest payload a peer may send: a snapshot or a message of our codec, whichever is larger
        self.max_data = max(self.snapshot_codec.wire_bytes(layout), 4 * layout.numel + 1024)

    # -- edges -------------------------------------------------------------------------------------
    def _edge(self, peer: str) -> _Edge:
        edge = self._edges.pop(peer, None) or _Edge()
        self._edges[peer] = edge
        while len(self._edges) > self.capacity:
            self._edges.popitem(last=False)
        return edge

    def _fresh_ref(self) -> _Ref:
        return _Ref(cur=self.init, cur_fp=self.init_fp)

    def __len__(self) -> int:
        return len(self._edges)

    def ack_for(self, peer: str) -> bytes:
        """Fingerprint of the reference we hold of ``peer``'s stream (``b""`` if none)."""
        edge = self._edges.get(peer)
        return edge.inc.cur_fp if edge is not None and edge.inc is not None else b""

    def reference_of(self, peer: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(our reference of peer, peer's reference of us)`` — for tests and diagnostics."""
        edge = self._edges.get(peer)
        if edge is None:
            return None, None
        return (edge.inc.cur if edge.inc else None), (edge.out.cur if edge.out else None)

    # -- sending -----------------------------------------------------------------------------------
    def encode(self, peer: str, model: torch.Tensor, *, round: int,
               peer_ack: bytes | None = None) -> Outgoing:
        """Encode ``model`` ``(d,)`` for ``peer``.

        ``peer_ack`` (responder only): the fingerprint the peer's request said it holds of our stream;
        the outgoing reference is reconciled with it first (kept, rolled back one step, or dropped for a
        snapshot). The requester passes ``None`` and reconciles through the reply's ``ack``.
        """
        edge = self._edge(peer)
        if peer_ack is not None and edge.out is not None:
            if peer_ack == edge.out.cur_fp:
                pass
            elif peer_ack and peer_ack == edge.out.prev_fp:
                edge.out.rollback()
            else:
                edge.out, edge.snapshot_next = None, True
        model = model.detach().to("cpu", torch.float32).contiguous()
        if edge.out is None and not edge.snapshot_next:
            edge.out = self._fresh_ref()
        if edge.out is None:  # snapshot: the whole model in the snapshot codec
            data = self.snapshot_codec.encode(model, self.layout)
            new = self.snapshot_codec.decode(data, self.layout)
            base_fp = b""
            self.snapshots_sent += 1
        else:
            if edge.state is None:
                edge.state = self.codec.new_state(self.layout)
            data = self.codec.encode(model - edge.out.cur, self.layout, edge.state)
            new = edge.out.cur + self.codec.decode(data, self.layout)
            base_fp = edge.out.cur_fp
        new_fp = ref_fingerprint(new)
        body = {"v": VERSION, "fp": self.spec_fingerprint, "r": round, "c": self.codec.spec if base_fp
                else self.snapshot_codec.spec, "base": base_fp, "new": new_fp, "ack": self.ack_for(peer),
                "data": data}
        return Outgoing(payload=msgpack.packb(body, use_bin_type=True), peer=peer, base_fp=base_fp, new=new,
                        new_fp=new_fp)

    def commit(self, out: Outgoing) -> None:
        """Make ``out`` our outgoing reference for its peer (the peer has it, or will roll back to it)."""
        edge = self._edge(out.peer)
        if out.base_fp == b"":
            edge.out, edge.snapshot_next = _Ref(cur=out.new, cur_fp=out.new_fp), False
        elif edge.out is not None and edge.out.cur_fp == out.base_fp:
            edge.out.commit(out.new, out.new_fp)
        else:  # the reference moved since encoding (should not happen with one exchange per peer)
            edge.out, edge.snapshot_next = None, True

    def settle_request(self, out: Outgoing, reply_ack: bytes) -> None:
        """Requester: the reply acknowledged ``reply_ack`` for our stream; commit, keep, or reset."""
        if reply_ack == out.new_fp:
            self.commit(out)
            return
        edge = self._edge(out.peer)
        current = edge.out.cur_fp if edge.out is not None else None
        if reply_ack != current:  # the peer holds neither the old nor the new reference: start over
            edge.out, edge.snapshot_next = None, True

    # -- receiving ---------------------------------------------------------------------------------
    def decode(self, peer: str, payload: bytes) -> Incoming:
        """Apply ``peer``'s message to our reference of its stream; return the view and its ack.

        Raises
        ------
        RefMismatch
            The base is not a reference we hold (our copy of the stream is dropped: the peer learns it
            from our ``ack`` and sends a snapshot next).
        CodecError, PayloadMismatch, ProtocolError
            Malformed payload; our references are unchanged.
        """
        body = self._parse(payload)
        edge = self._edge(peer)
        codec, base_fp = self.codec, body["base"]
        base: torch.Tensor | None = None  # None: a snapshot
        if base_fp == b"":
            if body["c"] != self.snapshot_codec.spec:
                raise PayloadMismatch(f"snapshot codec {body['c']!r}, expected {self.snapshot_codec.spec!r}")
            codec = self.snapshot_codec
        else:
            if body["c"] != self.codec.spec:
                raise PayloadMismatch(f"codec {body['c']!r}, this swarm uses {self.codec.spec!r}")
            ref = edge.inc
            if ref is not None and base_fp == ref.cur_fp:
                base = ref.cur
            elif ref is not None and base_fp == ref.prev_fp:
                base = ref.prev  # the sender never saw our ack of its last message: it is one step back
            elif base_fp == self.init_fp:
                base = self.init  # first contact, or the sender forgot the edge (evicted) and starts over
            else:
                edge.inc = None
                raise RefMismatch(f"message from {peer} was encoded against a reference we do not hold",
                                  ack=body["ack"])
        delta = codec.decode(body["data"], self.layout)
        new = delta if base is None else base + delta
        new_fp = ref_fingerprint(new)
        if new_fp != body["new"]:
            edge.inc = None
            raise RefMismatch(f"reference from {peer} does not reproduce its fingerprint", ack=body["ack"])
        if not bool(torch.isfinite(new).all()):
            raise PayloadMismatch("reconstructed model contains NaN or Inf")
        # prev is the base: if the sender never learns that we applied this, it encodes from base again
        edge.inc = _Ref(cur=new, cur_fp=new_fp, prev=base, prev_fp=base_fp if base is not None else b"")
        return Incoming(view=new, ack=body["ack"])

    def _parse(self, payload: bytes) -> dict[str, Any]:
        if not isinstance(payload, bytes | bytearray):
            raise ProtocolError(f"replica payload must be bytes, got {type(payload).__name__}")
        if len(payload) > self.max_data + _OVERHEAD:
            limit = self.max_data + _OVERHEAD
            raise ProtocolError(f"replica payload of {len(payload)} bytes exceeds {limit}")
        body = unpack_limited(bytes(payload), max_bin=max(self.max_data, MAX_FINGERPRINT_BYTES), max_str=64,
                              max_map=8)
        if not (isinstance(body, dict) and body.keys() == _KEYS):
            raise ProtocolError(f"replica payload must be a map with keys {sorted(_KEYS)}")
        if type(body["v"]) is not int or body["v"] != VERSION:
            raise ProtocolError(f"unsupported replica payload version {body['v']!r}")
        if body["fp"] != self.spec_fingerprint:
            raise PayloadMismatch("model fingerprint differs from ours")
        if not is_counter(body["r"]) or not isinstance(body["c"], str):
            raise ProtocolError("round must be an int in [0, 2**63) and the codec a string")
        for key, sizes in (("base", (0, FP_BYTES)), ("new", (FP_BYTES,)), ("ack", (0, FP_BYTES))):
            if not isinstance(body[key], bytes) or len(body[key]) not in sizes:
                raise ProtocolError(f"{key} must be {' or '.join(map(str, sizes))} bytes")
        if not isinstance(body["data"], bytes):
            raise ProtocolError("data must be bytes")
        return body


__all__ = ["FP_BYTES", "SNAPSHOT_CODEC", "CodecError", "Incoming", "Outgoing", "RefMismatch", "ReplicaBook",
           "ref_fingerprint"]
