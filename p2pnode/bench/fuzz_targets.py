"""Every decoder of untrusted bytes as a fuzz target: what it may raise, and valid inputs to mutate.

Shared by the hypothesis fuzz tests (``tests/unit/test_fuzz_decoders.py``) and the coverage-guided
atheris harness (``scripts/fuzz_atheris.py``). A target's ``decode(data)`` must either return (then
``check`` holds for what it returned) or raise one of ``errors``, its documented typed error; anything
else is a bug. ``samples`` are valid inputs that decode.

Signed formats are fuzzed twice: as they arrive (``envelope``, ``record``...), where random bytes almost
never get past the signature, and as ``…-signed`` targets whose ``data`` is the signed part: the target
signs it with a fixed key before decoding, so the fuzzer reaches the parsing behind the signature.
Keys are fixed (derived from constant bytes), so a failing input reproduces.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.control import DOMAIN as CONTROL_DOMAIN
from p2pnode.control import MAGIC, CommandVerifier, ControlError, sign_command
from p2pnode.errors import MessageRejected
from p2pnode.identity import Identity
from p2pnode.sybilwall import SybilWallExtension
from p2pnode.transport.framing import decode_header, encode_header
from protocols import records, sybil_records
from protocols.codecs import Codec, CodecError, Layout, make_codec
from protocols.envelope import SIGNATURE_BYTES, open_envelope, seal, signing_input
from protocols.envelope import VERSION as ENVELOPE_VERSION
from protocols.errors import ProtocolError
from protocols.exchange import pack_exchange, unpack_exchange
from protocols.keys import pubkey_from_peer_id
from protocols.model import decode_model, encode_model
from protocols.replicas import ReplicaBook
from protocols.spsa import (
    ScalarBatch,
    ScalarLog,
    SpsaError,
    decode_batch,
    decode_summary,
    encode_batch,
    encode_summary,
    open_batch,
    seal_batch,
)
from protocols.spsa_state import decode_state, encode_state

SWARM = "fuzz"
LIMIT = 1 << 16  # envelope and exchange limit of the targets
LAYOUT = Layout(((8, 3, 3, 3), (8,), (10, 72), (10,), ()))  # conv, bias, a low-rank matrix, a scalar
FINGERPRINT = bytes(range(16))
CODECS = ("dense", "fp16", "bf16", "int8", "int8:16", "terngrad", "topk:0.1", "topk:0.01", "powersgd:2")
REPLICA_CODECS = ("topk:0.1", "int8")
NOW = 1_800_000_000.0
SPSA_K, SPSA_STEPS = 2, 64


def fixed_identity(n: int) -> Identity:
    """A reproducible key (not secret: for fuzzing only)."""
    return Identity(private_key=Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32))


KEY, OPERATOR = fixed_identity(1), fixed_identity(2)


@dataclass(frozen=True)
class DecoderTarget:
    """One decoder: ``decode(data)`` returns (``check`` holds) or raises one of ``errors``."""

    name: str
    decode: Callable[[bytes], object]
    errors: tuple[type[Exception], ...]
    samples: tuple[bytes, ...]
    check: Callable[[object], None] = field(default=lambda _: None)


def _model() -> torch.Tensor:
    return torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(0))


def check_flat(numel: int) -> Callable[[object], None]:
    """A decoded model or increment must be a finite float32 vector of ``numel`` elements."""
    def check(out: object) -> None:
        flat = out if isinstance(out, torch.Tensor) else getattr(out, "flat", getattr(out, "view", None))
        assert isinstance(flat, torch.Tensor), f"decoded {type(out).__name__}, not a model"
        assert flat.dtype == torch.float32, flat.dtype
        assert flat.shape == (numel,), flat.shape
        assert bool(torch.isfinite(flat).all()), "decoded values must be finite"
    return check


def _signed_envelope(fields: bytes) -> bytes:
    """``fields`` (everything after the version byte and key) in an envelope signed by :data:`KEY`."""
    signed = bytes([ENVELOPE_VERSION]) + pubkey_from_peer_id(KEY.peer_id) + fields
    return signed + KEY.sign(signing_input(SWARM, signed))


def _inner(sealed: bytes) -> bytes:
    return sealed[33:-SIGNATURE_BYTES]


def _transport_targets() -> list[DecoderTarget]:
    model = encode_model(_model(), fingerprint=FINGERPRINT, round=3)
    envelopes = (seal(KEY, kind="push", swarm=SWARM, round=3, seq=7, payload=pack_exchange(model)),
                 seal(KEY, kind="sb", swarm=SWARM, round=0, seq=1, payload=b"\x02\x01ab"))

    def envelope(data: bytes) -> object:
        return open_envelope(data, max_bytes=LIMIT, swarm=SWARM)

    def header(data: bytes) -> object:
        return decode_header(data, max_message_bytes=1 << 20)

    def model_payload(data: bytes) -> object:
        return decode_model(data, expected_numel=LAYOUT.numel, fingerprint=FINGERPRINT)

    return [
        DecoderTarget("frame-header", header, (MessageRejected,),
                      (encode_header(0, 100), encode_header(1, 10))),
        DecoderTarget("envelope", envelope, (ProtocolError,), envelopes),
        DecoderTarget("envelope-signed", lambda d: envelope(_signed_envelope(d)), (ProtocolError,),
                      tuple(_inner(e) for e in envelopes)),
        DecoderTarget("exchange", lambda d: unpack_exchange(d, max_bytes=LIMIT), (ProtocolError,),
                      (pack_exchange(model), pack_exchange(model, b"attachment"))),
        DecoderTarget("model", model_payload, (ProtocolError,), (model,), check_flat(LAYOUT.numel)),
    ]


def _codec_targets() -> list[DecoderTarget]:
    x, out = _model(), []
    for spec in CODECS:
        codec = make_codec(spec)

        def decode(data: bytes, codec: Codec = codec) -> object:
            return codec.decode(data, LAYOUT)

        samples = (codec.encode(x, LAYOUT), codec.encode(0.1 * x, LAYOUT))
        out.append(DecoderTarget(f"codec:{spec}", decode, (CodecError,), samples, check_flat(LAYOUT.numel)))
    init = torch.zeros(LAYOUT.numel)
    for spec in REPLICA_CODECS:
        sender = ReplicaBook(spec, LAYOUT, init, spec_fingerprint=FINGERPRINT)
        first = sender.encode("receiver", x, round=1)
        sender.commit(first)
        snapshot = sender.encode("receiver", x, round=2, peer_ack=b"\xff" * 16)  # an ack it does not know

        def replica(data: bytes, spec: str = spec) -> object:  # a fresh receiver: first contact
            return ReplicaBook(spec, LAYOUT, init, spec_fingerprint=FINGERPRINT).decode("sender", data)

        samples = (first.payload, snapshot.payload)
        out.append(DecoderTarget(f"replica:{spec}", replica, (ProtocolError,), samples,
                                 check_flat(LAYOUT.numel)))
    return out


def _spsa_samples() -> tuple[ScalarBatch, ScalarLog, bytes]:
    batch = ScalarBatch(origin=KEY.peer_id, start=0, k=SPSA_K, codes=bytes(range(20)))
    sealed = seal_batch(KEY, batch, swarm=SWARM)
    log = ScalarLog(k=SPSA_K, max_origins=16)
    log.add(ScalarBatch(origin=KEY.peer_id, start=0, k=SPSA_K, codes=batch.codes, sealed=sealed))
    log.add(ScalarBatch(origin=OPERATOR.peer_id, start=12, k=SPSA_K, codes=b"\x07" * 6))
    return batch, log, sealed


def _spsa_targets() -> list[DecoderTarget]:
    batch, log, sealed = _spsa_samples()
    pending = [(KEY.peer_id, 10, 1, 200)]
    state = encode_state(_model(), log, pending, step=10, fingerprint=FINGERPRINT, round=2)

    def sealed_batch(data: bytes) -> object:
        return open_batch(data, swarm=SWARM, max_steps=SPSA_STEPS, max_k=4)

    def payload(data: bytes) -> object:
        return decode_batch(data, origin=KEY.peer_id, start=0, max_steps=SPSA_STEPS, max_k=4)

    def spsa_state(data: bytes) -> object:
        return decode_state(data, max_bytes=1 << 20, numel=LAYOUT.numel, fingerprint=FINGERPRINT, k=SPSA_K,
                            max_origins=16)

    summaries = (encode_summary(log.holdings()), encode_summary({KEY.peer_id: (5, ((7, 9), (12, 12)))}))
    return [
        DecoderTarget("spsa-batch", payload, (SpsaError,), (encode_batch(batch),)),
        DecoderTarget("spsa-batch-sealed", sealed_batch, (SpsaError,), (sealed,)),
        DecoderTarget("spsa-batch-signed", lambda d: sealed_batch(_signed_envelope(d)), (SpsaError,),
                      (_inner(sealed),)),
        DecoderTarget("spsa-summary", lambda d: decode_summary(d, max_origins=16), (SpsaError,), summaries),
        DecoderTarget("spsa-state", spsa_state, (SpsaError,), (state,), check_flat(LAYOUT.numel)),
    ]


def _record_targets() -> list[DecoderTarget]:
    rec = records.MembershipRecord(peer_id=KEY.peer_id, swarm=SWARM, maddrs=("/ip4/127.0.0.1/tcp/1",),
                                   round=4, mode="gossip", codec="dense", model_fingerprint=FINGERPRINT,
                                   timestamp=NOW)
    packed = records.pack_record(rec, KEY)
    fields = msgpack.unpackb(packed)[0]
    hist = sybil_records.pack_sybil_record(KEY, origin=KEY.peer_id, round=3, hop=1, history=0.01 * _model())
    hop, origin, signed, _ = msgpack.unpackb(hist, raw=False)
    limit = sybil_records.record_max_bytes(LAYOUT.numel)

    def record_signed(data: bytes) -> object:
        return records.unpack_record(msgpack.packb([data, KEY.sign(records.DOMAIN + data)]))

    def sybil(data: bytes) -> object:
        return sybil_records.unpack_sybil_record(data, expected_numel=LAYOUT.numel, max_bytes=limit)

    def sybil_signed(data: bytes) -> object:
        return sybil(msgpack.packb([hop, origin, data, KEY.sign(sybil_records.DOMAIN + data)]))

    def attachment(data: bytes) -> object:
        ext = SybilWallExtension(OPERATOR, numel=LAYOUT.numel, rng=random.Random(0))
        ext.receive(KEY.peer_id, data)
        return ext

    own = sybil_records.pack_sybil_record(KEY, origin=KEY.peer_id, round=3, hop=0, history=0.01 * _model())
    third = fixed_identity(3)
    relayed = sybil_records.pack_sybil_record(third, origin=third.peer_id, round=5, hop=2, history=_model())
    return [
        DecoderTarget("record", records.unpack_record, (ProtocolError,), (packed,)),
        DecoderTarget("record-signed", record_signed, (ProtocolError,), (fields,)),
        DecoderTarget("sybil-record", sybil, (ProtocolError,), (hist,)),
        DecoderTarget("sybil-record-signed", sybil_signed, (ProtocolError,), (signed,)),
        DecoderTarget("sybil-attachment", attachment, (ProtocolError,),
                      tuple(msgpack.packb(pair) for pair in ([own, relayed], [None, relayed], [own, None]))),
    ]


def _control_targets() -> list[DecoderTarget]:
    def verifier() -> CommandVerifier:  # fresh each time: no nonce is ever a replay
        return CommandVerifier([OPERATOR.peer_id], swarm=SWARM, peer_id=KEY.peer_id, test_mode=True,
                               clock=lambda: NOW)

    def control_signed(body: bytes) -> object:
        key = pubkey_from_peer_id(OPERATOR.peer_id)
        return verifier().open(MAGIC + bytes([1]) + key + OPERATOR.sign(CONTROL_DOMAIN + body) + body)

    commands = (sign_command(OPERATOR, "pause", swarm=SWARM, ts=NOW, nonce="ab" * 16),
                sign_command(OPERATOR, "stall", swarm=SWARM, target=KEY.peer_id, args={"seconds": 1.5},
                             ts=NOW, nonce="cd" * 16))
    return [
        DecoderTarget("control", lambda d: verifier().open(d), (ControlError,), commands),
        DecoderTarget("control-signed", control_signed, (ControlError,), tuple(c[101:] for c in commands)),
    ]


def build_targets() -> dict[str, DecoderTarget]:
    """Every target, by name (building them signs and encodes a few samples: call once)."""
    targets = [*_transport_targets(), *_codec_targets(), *_spsa_targets(), *_record_targets(),
               *_control_targets()]
    return {t.name: t for t in targets}
