"""The SPSA state transfer (join and resync): a peer's model, scalar log and pending scalars.

Wire (msgpack, the payload of a ``"ss"`` envelope)::

    [model: bin (protocols.model payload), log: ScalarLog.state_dict(), pending: [[origin, step, k, code]],
     step: int]

A joiner or a node that resyncs asks up to three peers and adopts one state: what comes back is as
untrusted as any message. :func:`decode_state` checks the type and range of every field *before*
anything is built from it (a count is never used as a length: ``bytes(n)`` of a claimed ``n`` would
allocate it), so a lying donor costs its own state and nothing else; it raises
:class:`~protocols.spsa.SpsaError` (a :class:`~protocols.errors.ProtocolError`) and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import torch

from protocols.envelope import MAX_NAME_CHARS, is_counter, unpack_limited
from protocols.errors import ProtocolError
from protocols.model import decode_model, encode_model
from protocols.spsa import VERSION, ScalarLog, SpsaError

Pending = tuple[str, int, int, int]  # (origin, step, k, code) of a received scalar not applied yet
_LOG_KEYS = frozenset({"v", "k", "banned", "origins"})
_ENTRY_KEYS = frozenset({"prefix", "floor", "codes", "signed"})


@dataclass(frozen=True, slots=True)
class SpsaState:
    """A checked state: the model (flat fp32), the scalar log and the scalars pending on it."""

    flat: torch.Tensor
    log: ScalarLog
    pending: list[Pending]
    step: int


def encode_state(flat: torch.Tensor, log: ScalarLog, pending: Sequence[Pending], *, step: int,
                 fingerprint: bytes, round: int) -> bytes:
    """Serialise a node's state for a peer that asked for it."""
    model = encode_model(flat, fingerprint=fingerprint, round=round)
    return msgpack.packb([model, log.state_dict(), list(pending), step], use_bin_type=True)


def decode_state(data: bytes, *, max_bytes: int, numel: int, fingerprint: bytes, k: int,
                 max_origins: int) -> SpsaState:
    """Parse and check a state from an untrusted peer.

    Raises
    ------
    SpsaError
        Anything malformed: the layout, the model (its own checks), a log field of the wrong type or
        out of range, an inconsistent log, a pending scalar that is not ``[origin, step, k, code]`` with
        ``0 <= k < K`` and ``0 <= code <= 255``.
    """
    try:
        body = unpack_limited(data, max_bin=max_bytes, max_array=1 << 22, max_map=max(4, max_origins))
        if not (isinstance(body, list) and len(body) == 4 and isinstance(body[0], bytes)):
            raise SpsaError("state must be [model, log, pending, step]")
        flat = decode_model(body[0], expected_numel=numel, fingerprint=fingerprint).flat
    except SpsaError:
        raise
    except ProtocolError as exc:
        raise SpsaError(f"bad state: {exc}") from exc
    if not is_counter(body[3]):
        raise SpsaError(f"state step must be an int in [0, 2**63), got {body[3]!r}")
    return SpsaState(flat=flat, log=decode_log(body[1], k=k, max_origins=max_origins),
                     pending=decode_pending(body[2], k=k), step=body[3])


def _is_origin(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS


def _check_entry(origin: object, entry: object, k: int) -> None:
    if not _is_origin(origin):
        raise SpsaError("log origin must be a short non-empty string")
    if not (isinstance(entry, dict) and entry.keys() == _ENTRY_KEYS):
        raise SpsaError(f"log entry must be a map with keys {sorted(_ENTRY_KEYS)}")
    prefix, floor, codes, signed = (entry[key] for key in ("prefix", "floor", "codes", "signed"))
    if not (type(prefix) is int and -1 <= prefix < 2**63 - 1 and is_counter(floor)):
        raise SpsaError("log prefix and floor must be step counters")
    if not (isinstance(codes, list) and all(isinstance(c, list) and len(c) == 2 and is_counter(c[0])
                                            and isinstance(c[1], bytes) and len(c[1]) == k for c in codes)):
        raise SpsaError(f"log codes must be [[step, {k} bytes]]")
    if not (isinstance(signed, list) and all(
            isinstance(b, list) and len(b) == 3 and is_counter(b[0]) and isinstance(b[1], bytes)
            and (b[2] is None or isinstance(b[2], bytes)) for b in signed)):
        raise SpsaError("log signed batches must be [[start, codes, sealed or nil]]")


def decode_log(state: object, *, k: int, max_origins: int) -> ScalarLog:
    """A :class:`ScalarLog` from an untrusted :meth:`ScalarLog.state_dict` snapshot (SpsaError if bad)."""
    if not (isinstance(state, dict) and state.keys() == _LOG_KEYS):
        raise SpsaError(f"log must be a map with keys {sorted(_LOG_KEYS)}")
    if type(state["v"]) is not int or state["v"] != VERSION or type(state["k"]) is not int or state["k"] != k:
        raise SpsaError(f"log has version {state['v']!r} and k {state['k']!r}, expected {VERSION} and {k}")
    banned, origins = state["banned"], state["origins"]
    if not (isinstance(banned, list) and all(_is_origin(o) for o in banned)):
        raise SpsaError("banned origins must be short non-empty strings")
    if not isinstance(origins, dict) or len(origins) > max_origins:
        raise SpsaError(f"log origins must be a map of at most {max_origins} entries")
    for origin, entry in origins.items():
        _check_entry(origin, entry, k)
    log = ScalarLog(k=k, max_origins=max_origins)
    try:
        log.load_state_dict(state)
    except ValueError as exc:  # an inconsistent snapshot, or a signed batch that is not a batch
        raise SpsaError(f"bad log: {exc}") from exc
    return log


def decode_pending(items: object, *, k: int) -> list[Pending]:
    """Received scalars not applied yet, each ``[origin, step, j, code]``, ``j < k`` (SpsaError if bad)."""
    if not isinstance(items, list):
        raise SpsaError("pending scalars must be a list")
    out: list[Pending] = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 4):
            raise SpsaError("a pending scalar must be [origin, step, k, code]")
        origin, step, j, code = item
        if not (_is_origin(origin) and is_counter(step) and type(j) is int and 0 <= j < k
                and type(code) is int and 0 <= code <= 255):
            raise SpsaError(f"pending scalar {item!r:.80} is out of range")
        out.append((origin, step, j, code))
    return out


__all__ = ["Pending", "SpsaState", "decode_log", "decode_pending", "decode_state", "encode_state"]
