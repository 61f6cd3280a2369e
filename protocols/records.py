"""Signed membership records, one per peer, published on the DHT under the swarm key.

Wire format (msgpack)::

    [fields: bin, signature: bin]
    fields = msgpack([1, peer_id, public_key: bin, swarm, maddrs: [str], round, mode, codec,
                      model_fingerprint: bin, timestamp: float])

``signature`` is Ed25519 over ``b"p2pnode-record-v1\\x00" + fields`` by ``peer_id``'s key. The
public key is recoverable from an Ed25519 peer id; it is carried too (as DESIGN §3 lists it) and
must equal the one the peer id encodes. :func:`unpack_record` parses ``fields`` with tight msgpack
limits, verifies the signature using only ``peer_id``, and only then checks the other fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import msgpack

from protocols.envelope import is_counter, unpack_limited
from protocols.errors import BadSignature, ProtocolError, TooLarge
from protocols.keys import Signer, pubkey_from_peer_id, verify

VERSION = 1
DOMAIN = b"p2pnode-record-v1\x00"
MAX_RECORD_BYTES = 8192
MAX_MADDRS = 16
MAX_MADDR_CHARS = 256
MAX_NAME_CHARS = 64  # peer id, swarm, mode, codec
MAX_FINGERPRINT_BYTES = 64
_N_FIELDS = 10


@dataclass(frozen=True, slots=True)
class MembershipRecord:
    """What a peer announces about itself: where to reach it and what it runs."""

    peer_id: str
    swarm: str
    maddrs: tuple[str, ...]
    round: int
    mode: str
    codec: str
    model_fingerprint: bytes
    timestamp: float


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise ProtocolError(f"{what} must be a non-empty string of at most {MAX_NAME_CHARS} characters")
    return value


def _check(rec: MembershipRecord) -> None:
    """Every field limit; shared by packing (fail early) and unpacking (never trust the wire)."""
    _name(rec.peer_id, "peer_id")
    _name(rec.swarm, "swarm")
    _name(rec.mode, "mode")
    _name(rec.codec, "codec")
    if len(rec.maddrs) > MAX_MADDRS:
        raise ProtocolError(f"{len(rec.maddrs)} maddrs, at most {MAX_MADDRS} allowed")
    for maddr in rec.maddrs:
        if not isinstance(maddr, str) or not 0 < len(maddr) <= MAX_MADDR_CHARS or not maddr.startswith("/"):
            raise ProtocolError(f"maddr must be a multiaddr string of at most {MAX_MADDR_CHARS} characters")
    if not is_counter(rec.round):
        raise ProtocolError(f"round must be an int in [0, 2**63), got {rec.round!r}")
    if not isinstance(rec.model_fingerprint, bytes) or len(rec.model_fingerprint) > MAX_FINGERPRINT_BYTES:
        raise ProtocolError(f"model_fingerprint must be at most {MAX_FINGERPRINT_BYTES} bytes")
    if type(rec.timestamp) is not float or not math.isfinite(rec.timestamp) or rec.timestamp < 0:
        raise ProtocolError(f"timestamp must be a finite non-negative float, got {rec.timestamp!r}")


def pack_record(rec: MembershipRecord, signer: Signer) -> bytes:
    """Serialise and sign ``rec``; ``signer`` must be the peer the record describes.

    Raises
    ------
    ValueError
        ``signer.peer_id != rec.peer_id``.
    ProtocolError
        A field exceeds a limit that :func:`unpack_record` enforces.
    """
    if signer.peer_id != rec.peer_id:
        raise ValueError(f"record for {rec.peer_id} cannot be signed by {signer.peer_id}")
    rec = dataclasses.replace(rec, timestamp=float(rec.timestamp), maddrs=tuple(rec.maddrs))
    _check(rec)
    fields = msgpack.packb(
        [VERSION, rec.peer_id, pubkey_from_peer_id(rec.peer_id), rec.swarm, list(rec.maddrs), rec.round,
         rec.mode, rec.codec, rec.model_fingerprint, rec.timestamp],
        use_bin_type=True,
    )
    data = msgpack.packb([fields, signer.sign(DOMAIN + fields)], use_bin_type=True)
    if len(data) > MAX_RECORD_BYTES:
        raise ProtocolError(f"record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
    return data


def unpack_record(data: bytes, *, max_bytes: int = MAX_RECORD_BYTES) -> MembershipRecord:
    """Verify and parse a record from an untrusted source (a DHT answer, a peer).

    Raises
    ------
    TooLarge
        ``len(data) > max_bytes``.
    BadSignature
        The signature does not verify against the record's peer id.
    ProtocolError
        Anything else malformed.
    """
    if not isinstance(data, bytes):
        raise ProtocolError(f"record must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise TooLarge(f"record of {len(data)} bytes exceeds the limit of {max_bytes}")
    outer = unpack_limited(data, max_bin=max_bytes, max_array=2)
    if not (isinstance(outer, list) and len(outer) == 2):
        raise ProtocolError("record must be a 2-element array")
    fields, signature = outer
    if not (isinstance(fields, bytes) and isinstance(signature, bytes)):
        raise ProtocolError("record fields and signature must be bytes")
    items = unpack_limited(fields, max_bin=MAX_FINGERPRINT_BYTES, max_str=MAX_MADDR_CHARS,
                           max_array=max(_N_FIELDS, MAX_MADDRS))
    if not (isinstance(items, list) and len(items) == _N_FIELDS):
        raise ProtocolError(f"record fields must be a {_N_FIELDS}-element array")
    version, peer_id, public_key, swarm, maddrs, rnd, mode, codec, fingerprint, timestamp = items
    if version != VERSION or type(version) is not int:
        raise ProtocolError(f"unsupported record version {version!r}")
    _name(peer_id, "peer_id")
    if not verify(peer_id, DOMAIN + fields, signature):
        raise BadSignature(f"record signature does not verify for {peer_id}")
    if public_key != pubkey_from_peer_id(peer_id):
        raise ProtocolError("record public key does not match its peer id")
    if not isinstance(maddrs, list):
        raise ProtocolError("maddrs must be an array")
    rec = MembershipRecord(peer_id=peer_id, swarm=swarm, maddrs=tuple(maddrs), round=rnd, mode=mode,
                           codec=codec, model_fingerprint=fingerprint, timestamp=timestamp)
    _check(rec)
    return rec
