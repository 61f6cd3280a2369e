"""Fuzzed messages for a live node (``p2pnode bench fuzz``): structure-aware mutations and random bytes.

Every message is built by one *lane* (one libp2p identity that sends one message at a time) and says
what the node must do with it: :data:`ACCEPT` (valid by construction: a fresh push of a model the node
itself sent us, so the fuzz does not disturb its training) or :data:`REJECT`. The mutations, by layer:

- wire: bit flips, truncation, trailing garbage, a random or zeroed signature, another key in the
  header of a valid sealed envelope (the signature no longer verifies); a replay of an earlier one;
- envelope: signed by another key than the connection's, sealed for another swarm, a kind the node
  does not serve, and hand-built layouts signed correctly (empty, overlong or non-ASCII kind, kind
  length past the end, non-minimal, overlong or truncated varints, another version byte);
- exchange body (re-sealed, so the signature verifies and the parser behind it runs): truncated,
  garbage after it, another structure, an attachment the node has no use for;
- model payload (re-sealed): each field replaced by a wrong value or type, a key missing or added,
  the data cut or extended, NaN/Inf at random positions, msgpack headers claiming huge lengths;
- random bytes (pure, or behind a valid version byte and key), random msgpack objects as payload;
- frames (sent on a bare stream, not through the transport): an unknown status byte, a request
  with the rejection status, a header announcing more than the node's limit.

Every choice is drawn from a ``random.Random`` seeded per lane, so a run is reproducible up to the
node's own timing.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from p2pnode.identity import Identity
from p2pnode.transport.framing import STATUS_OK, STATUS_REJECTED
from protocols.envelope import SIGNATURE_BYTES, VERSION, seal, signing_input, uvarint
from protocols.exchange import pack_exchange
from protocols.keys import pubkey_from_peer_id
from protocols.model import encode_model

ACCEPT, REJECT = "accept", "reject"
KIND_PUSH = "push"
# kinds a gossip-mode node does not take as a request (other modes' kinds, replies, nonsense)
WRONG_KINDS = ("pull", "jstate", "sg", "ss", "sb", "inc", "ack", "PUSH", "push ", "zz")
_REPLAY_MEMORY = 64  # earlier messages of the lane kept for replays


@dataclass(frozen=True, slots=True)
class Target:
    """What the fuzzer knows of the node under test: all of it public (swarm, id, the task's model)."""

    swarm: str
    peer_id: str
    fingerprint: bytes
    init: torch.Tensor  # the swarm's common initial model, flat fp32
    max_message_bytes: int

    @property
    def numel(self) -> int:
        return self.init.numel()


@dataclass(frozen=True, slots=True)
class Message:
    """One fuzzed message: ``data`` goes through the transport, or ``frame`` raw onto a bare stream."""

    category: str
    expect: str
    data: bytes = b""
    frame: bytes | None = None


@dataclass(slots=True)
class Lane:
    """One sender: its identity (the connection's peer id), its sequence numbers, what it sent."""

    identity: Identity
    rng: random.Random
    stranger: Identity = field(default_factory=Identity.generate)  # signs what this lane must not
    seq: int = 0
    sent: list[bytes] = field(default_factory=list)  # signed by us and past the replay guard
    model: torch.Tensor | None = None  # the latest model the node sent us

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def remember(self, data: bytes) -> None:
        self.sent.append(data)
        del self.sent[:-_REPLAY_MEMORY]


class MessageFactory:
    """Draws the next message of a lane (see the module docstring for what it can be)."""

    def __init__(self, target: Target, lane: Lane) -> None:
        self.t = target
        self.lane = lane
        self.rng = lane.rng
        self.weights = [weight for weight, _ in CASES.values()]
        self.builders = [build for _, build in CASES.values()]

    def next(self) -> Message:
        """The next message of this lane."""
        (build,) = self.rng.choices(self.builders, weights=self.weights)
        return build(self)

    # -- helpers -----------------------------------------------------------------------------------
    def _model(self) -> torch.Tensor:
        return self.lane.model if self.lane.model is not None else self.t.init

    def _model_body(self, **overrides: object) -> dict[str, object]:
        array = self._model().numpy().astype("<f4")
        body: dict[str, object] = {"v": 1, "fp": self.t.fingerprint, "r": self.rng.randrange(1000),
                                   "n": self.t.numel, "dt": "f32", "data": array.tobytes()}
        body.update(overrides)
        return body

    def _payload(self, model: bytes, attachment: bytes | None = None) -> bytes:
        return pack_exchange(model, attachment)

    def _valid_payload(self) -> bytes:
        return self._payload(encode_model(self._model(), fingerprint=self.t.fingerprint,
                                          round=self.rng.randrange(1000)))

    def _seal(self, payload: bytes, *, kind: str = KIND_PUSH, signer: Identity | None = None,
              swarm: str | None = None) -> bytes:
        return seal(signer or self.lane.identity, kind=kind, swarm=swarm or self.t.swarm,
                    round=self.rng.randrange(1 << 20), seq=self.lane.next_seq(), payload=payload)

    def _resealed(self, category: str, payload: bytes) -> Message:
        """A correctly signed push around a bad ``payload``: it passes the replay guard, then fails."""
        data = self._seal(payload)
        self.lane.remember(data)
        return Message(category, REJECT, data)

    def _bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def _size(self) -> int:
        """A length from 0 to ~64 KiB, small ones more often."""
        return int(math.exp(self.rng.uniform(0, math.log(65_536)))) - 1

    # -- accepted ----------------------------------------------------------------------------------
    def _valid(self) -> Message:
        data = self._seal(self._valid_payload())
        self.lane.remember(data)
        return Message("valid", ACCEPT, data)

    # -- wire: a valid sealed message, changed after signing ---------------------------------------
    def _sealed_valid(self) -> bytes:
        """A valid message that is *not* sent as is (its seq is used up, which changes nothing)."""
        return self._seal(self._valid_payload())

    def _replay(self) -> Message:
        if not self.lane.sent:
            return self._wire_bitflip()
        return Message("replay", REJECT, self.rng.choice(self.lane.sent))

    def _wire_bitflip(self) -> Message:
        data = bytearray(self._sealed_valid())
        for bit in self.rng.sample(range(8 * len(data)), self.rng.randint(1, 8)):  # distinct: never a no-op
            data[bit // 8] ^= 1 << (bit % 8)
        return Message("wire-bitflip", REJECT, bytes(data))

    def _wire_truncate(self) -> Message:
        data = self._sealed_valid()
        return Message("wire-truncate", REJECT, data[: self.rng.randrange(len(data))])

    def _wire_extend(self) -> Message:
        return Message("wire-extend", REJECT, self._sealed_valid() + self._bytes(self.rng.randint(1, 64)))

    def _wire_signature(self) -> Message:
        data = self._sealed_valid()
        signature = bytes(SIGNATURE_BYTES) if self.rng.random() < 0.3 else self._bytes(SIGNATURE_BYTES)
        return Message("wire-signature", REJECT, data[:-SIGNATURE_BYTES] + signature)

    def _wire_other_key(self) -> Message:
        data = self._sealed_valid()
        other = pubkey_from_peer_id(self.lane.stranger.peer_id)
        return Message("wire-other-key", REJECT, data[:1] + other + data[33:])

    # -- envelope ----------------------------------------------------------------------------------
    def _other_signer(self) -> Message:
        signer = self.lane.stranger if self.rng.random() < 0.5 else Identity.generate()
        return Message("other-signer", REJECT, self._seal(self._valid_payload(), signer=signer))

    def _wrong_swarm(self) -> Message:
        others = [self.t.swarm + "x", "default", self.t.swarm.upper() + "!", "s" * 128]
        swarm = self.rng.choice([s for s in others if s != self.t.swarm])
        return Message("wrong-swarm", REJECT, self._seal(self._valid_payload(), swarm=swarm))

    def _wrong_kind(self) -> Message:
        kind = self.rng.choice(WRONG_KINDS)
        return Message("wrong-kind", REJECT, self._seal(self._valid_payload(), kind=kind))

    def _envelope_layout(self) -> Message:
        """A hand-built envelope with one malformed field, signed correctly (or a wrong version)."""
        key = pubkey_from_peer_id(self.lane.identity.peer_id)
        kind, rnd, seq = b"push", uvarint(self.rng.randrange(1000)), uvarint(self.lane.next_seq())
        version = VERSION
        case = self.rng.randrange(7)
        if case == 0:
            kind = b""
        elif case == 1:
            kind = bytes(self.rng.randrange(128, 256) for _ in range(self.rng.randint(1, 8)))
        elif case == 2:
            rnd = bytes([0x80, 0x00])  # not minimal
        elif case == 3:
            seq = bytes([0xFF] * 9 + [0x01])  # more than 9 bytes
        elif case == 4:
            rnd, seq = bytes([0x80]), b""  # truncated: the payload must be empty for it to be last
        elif case == 5:
            version = self.rng.choice([0, 1, 2, 4, 255])
        head = bytes([version]) + key
        if case == 6:  # kind length past the end of the signed bytes
            signed = head + bytes([self.rng.randint(4, 255)]) + b"pus"
        else:
            body = b"" if case == 4 else self._valid_payload()
            signed = head + bytes([len(kind)]) + kind + rnd + seq + body
        return Message("envelope-layout", REJECT,
                       signed + self.lane.identity.sign(signing_input(self.t.swarm, signed)))

    # -- exchange body (re-sealed) -----------------------------------------------------------------
    def _exchange_truncate(self) -> Message:
        payload = self._valid_payload()
        return self._resealed("exchange-truncate", payload[: self.rng.randrange(len(payload))])

    def _exchange_garbage_after(self) -> Message:
        garbage = self._bytes(self.rng.randint(1, 256))
        return self._resealed("exchange-garbage-after", self._valid_payload() + garbage)

    def _exchange_structure(self) -> Message:
        model = encode_model(self._model(), fingerprint=self.t.fingerprint, round=1)
        shapes: list[object] = [[model], [model, None, None], {"model": model}, [None, model],
                                [model.decode("latin-1"), None], [model, "attachment"], model, [], 7,
                                [[model], None]]
        return self._resealed("exchange-structure", msgpack.packb(self.rng.choice(shapes), use_bin_type=True))

    def _exchange_attachment(self) -> Message:
        model = encode_model(self._model(), fingerprint=self.t.fingerprint, round=1)
        return self._resealed("exchange-attachment", self._payload(model, self._bytes(self._size() % 4096)))

    # -- model payload (re-sealed) -----------------------------------------------------------------
    def _model_field(self) -> Message:
        n = self.t.numel
        bad: dict[str, list[object]] = {
            "v": [0, 2, 255, "1", 1.0, True, None, -1, [1]],
            "fp": [b"", self._bytes(16), self._bytes(64), "fp", 7, None, self.t.fingerprint + b"\x00"],
            "r": [-1, 2**64 - 1, "3", 1.5, None, True, [1]],
            "n": [n + 1, n - 1, 0, 2**40, 2**64 - 1, -1, float(n), str(n), True, None],
            "dt": ["f16", "F32", "", "f32 ", 32, None, b"f32"],
            "data": ["data", 5, None, [b"x"], 1.5],
        }
        key = self.rng.choice(list(bad))
        body = self._model_body(**{key: self.rng.choice(bad[key])})
        return self._resealed("model-field", self._payload(msgpack.packb(body, use_bin_type=True)))

    def _model_keys(self) -> Message:
        body = self._model_body()
        if self.rng.random() < 0.5:
            del body[self.rng.choice(list(body))]
        else:
            body[self.rng.choice(["x", "V", "dat\u0430", "fp2"])] = self.rng.randrange(10)
        return self._resealed("model-keys", self._payload(msgpack.packb(body, use_bin_type=True)))

    def _model_data_length(self) -> Message:
        size = 4 * self.t.numel
        length = self.rng.choice([0, 1, size - 1, size - 4, size + 4, size + 1, self.rng.randrange(2 * size)])
        if length == size:
            length += 4
        data = (self._model().numpy().astype("<f4").tobytes() + self._bytes(64))[:length]
        data += bytes(max(0, length - len(data)))
        body = self._model_body(data=data)
        return self._resealed("model-data-length", self._payload(msgpack.packb(body, use_bin_type=True)))

    def _model_nonfinite(self) -> Message:
        array = self._model().numpy().astype("<f4")
        for _ in range(self.rng.randint(1, 5)):
            array[self.rng.randrange(array.size)] = self.rng.choice([np.nan, np.inf, -np.inf])
        body = self._model_body(data=array.tobytes())
        return self._resealed("model-nonfinite", self._payload(msgpack.packb(body, use_bin_type=True)))

    def _model_garbage_after(self) -> Message:
        model = encode_model(self._model(), fingerprint=self.t.fingerprint, round=1)
        garbage = self._bytes(self.rng.randint(1, 64))
        return self._resealed("model-garbage-after", self._payload(model + garbage))

    def _msgpack_huge_length(self) -> Message:
        """A msgpack header that claims far more than follows (or than any limit allows)."""
        huge = self.rng.choice([2**32 - 1, 2**31, 4 * self.t.numel + 1, self.t.max_message_bytes + 1])
        header = self.rng.choice([b"\xc6" + struct.pack(">I", huge),  # bin 32
                                  b"\xdb" + struct.pack(">I", huge),  # str 32
                                  b"\xdd" + struct.pack(">I", huge),  # array 32
                                  b"\xdf" + struct.pack(">I", huge),  # map 32
                                  b"\xc9" + struct.pack(">I", huge) + b"\x01"])  # ext 32
        tail = self._bytes(self.rng.randint(0, 64))
        if self.rng.random() < 0.5:  # as the exchange body
            return self._resealed("msgpack-huge-length", header + tail)
        if self.rng.random() < 0.5:  # as the model payload inside a valid exchange body
            return self._resealed("msgpack-huge-length", self._payload(header + tail))
        fields = msgpack.packb({"v": 1, "fp": self.t.fingerprint, "r": 1, "n": self.t.numel, "dt": "f32"},
                               use_bin_type=True)
        fields = bytes([0x86]) + fields[1:] + msgpack.packb("data") + header + tail  # 6 keys, data last
        return self._resealed("msgpack-huge-length", self._payload(fields))

    # -- random --------------------------------------------------------------------------------------
    def _random_object(self, depth: int = 0) -> object:
        leaves: list[Callable[[], object]] = [
            lambda: None, lambda: self.rng.random() < 0.5, lambda: self.rng.randrange(-(2**63), 2**64),
            lambda: self.rng.random() * 10.0 ** self.rng.randint(-300, 300),
            lambda: self._bytes(self._size() % 512),
            lambda: self._bytes(self.rng.randrange(32)).decode("latin-1")]
        if depth < 4 and self.rng.random() < 0.4:
            if self.rng.random() < 0.5:
                return [self._random_object(depth + 1) for _ in range(self.rng.randrange(8))]
            keys = ["v", "fp", "r", "n", "dt", "data", "x"]
            return {self.rng.choice(keys): self._random_object(depth + 1)
                    for _ in range(self.rng.randrange(8))}
        return self.rng.choice(leaves)()

    def _random_msgpack(self) -> Message:
        obj = self._random_object()
        payload = msgpack.packb(obj, use_bin_type=True)
        if self.rng.random() < 0.5:  # as the model payload of a valid exchange body
            payload = self._payload(payload)
        return self._resealed("random-msgpack", payload)

    def _random_payload(self) -> Message:
        return self._resealed("random-payload", self._bytes(self._size()))

    def _random_bytes(self) -> Message:
        return Message("random-bytes", REJECT, self._bytes(self._size()))

    def _random_after_key(self) -> Message:
        key = pubkey_from_peer_id(self.lane.identity.peer_id)
        return Message("random-after-key", REJECT, bytes([VERSION]) + key + self._bytes(self._size()))

    # -- frames --------------------------------------------------------------------------------------
    def _frame_status(self) -> Message:
        status = self.rng.choice([STATUS_REJECTED, *range(2, 256)])
        body = self._bytes(self.rng.randrange(300))
        return Message("frame-status", REJECT, frame=bytes([status]) + len(body).to_bytes(7, "big") + body)

    def _frame_over_limit(self) -> Message:
        length = self.rng.randint(self.t.max_message_bytes + 1, 2**56 - 1)
        return Message("frame-over-limit", REJECT, frame=bytes([STATUS_OK]) + length.to_bytes(7, "big"))


#: Every kind of message, by name: its weight in the draw and its builder.
CASES: dict[str, tuple[float, Callable[[MessageFactory], Message]]] = {
    "valid": (2, MessageFactory._valid),
    "replay": (3, MessageFactory._replay),
    "wire-bitflip": (6, MessageFactory._wire_bitflip),
    "wire-truncate": (4, MessageFactory._wire_truncate),
    "wire-extend": (3, MessageFactory._wire_extend),
    "wire-signature": (3, MessageFactory._wire_signature),
    "wire-other-key": (2, MessageFactory._wire_other_key),
    "other-signer": (3, MessageFactory._other_signer),
    "wrong-swarm": (3, MessageFactory._wrong_swarm),
    "wrong-kind": (3, MessageFactory._wrong_kind),
    "envelope-layout": (5, MessageFactory._envelope_layout),
    "exchange-truncate": (4, MessageFactory._exchange_truncate),
    "exchange-garbage-after": (3, MessageFactory._exchange_garbage_after),
    "exchange-structure": (4, MessageFactory._exchange_structure),
    "exchange-attachment": (2, MessageFactory._exchange_attachment),
    "model-field": (10, MessageFactory._model_field),
    "model-keys": (3, MessageFactory._model_keys),
    "model-data-length": (4, MessageFactory._model_data_length),
    "model-nonfinite": (4, MessageFactory._model_nonfinite),
    "model-garbage-after": (2, MessageFactory._model_garbage_after),
    "msgpack-huge-length": (5, MessageFactory._msgpack_huge_length),
    "random-msgpack": (4, MessageFactory._random_msgpack),
    "random-payload": (4, MessageFactory._random_payload),
    "random-bytes": (12, MessageFactory._random_bytes),
    "random-after-key": (3, MessageFactory._random_after_key),
    "frame-status": (1, MessageFactory._frame_status),
    "frame-over-limit": (1, MessageFactory._frame_over_limit),
}
