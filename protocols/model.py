"""Full-model payload: a flat fp32 parameter vector, dense, little-endian.

Wire format: a msgpack map ``{"v": 1, "fp": fingerprint, "r": round, "n": numel, "dt": "f32",
"data": bin}`` with ``len(data) == 4 * n``. The fingerprint names the model architecture (shapes
and order of the parameters), so a vector is only ever applied to the model it was taken from.

:func:`decode_model` never trusts a size from the wire: it bounds the whole message by the expected
element count before parsing, checks ``fp``, ``n`` and ``len(data)`` before building a tensor, and
refuses NaN/Inf. It is meant to run on the payload of an already verified envelope.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from protocols.envelope import is_counter, unpack_limited
from protocols.errors import PayloadMismatch, ProtocolError, TooLarge
from protocols.records import MAX_FINGERPRINT_BYTES

VERSION = 1
DTYPE = "f32"
_KEYS = frozenset({"v", "fp", "r", "n", "dt", "data"})
_OVERHEAD = 256  # map keys, fingerprint, counters: generous upper bound of everything but data


@dataclass(frozen=True, slots=True)
class ModelPayload:
    """A decoded model: ``flat`` is a writable 1-D float32 CPU tensor owned by the caller."""

    flat: torch.Tensor
    round: int
    fingerprint: bytes


def encode_model(flat: torch.Tensor, *, fingerprint: bytes, round: int) -> bytes:
    """Serialise a flat fp32 CPU vector (exactly ``4 * numel + O(100)`` bytes).

    Raises
    ------
    ValueError
        ``flat`` is not a 1-D float32 CPU tensor, or the fingerprint/round is out of range.
    """
    if flat.dim() != 1 or flat.dtype != torch.float32 or flat.device.type != "cpu":
        raise ValueError(f"expected a 1-D float32 CPU tensor, got {tuple(flat.shape)} {flat.dtype} "
                         f"on {flat.device}")
    if len(fingerprint) > MAX_FINGERPRINT_BYTES or not is_counter(round):
        raise ValueError("fingerprint must be at most 64 bytes and round an int in [0, 2**63)")
    array = flat.detach().contiguous().numpy()
    if sys.byteorder != "little":
        array = array.astype("<f4")
    body = {"v": VERSION, "fp": bytes(fingerprint), "r": round, "n": flat.numel(), "dt": DTYPE,
            "data": array.data.cast("B")}
    return msgpack.packb(body, use_bin_type=True)


def decode_model(data: bytes, *, expected_numel: int, fingerprint: bytes) -> ModelPayload:
    """Parse a payload from an untrusted peer for a model of ``expected_numel`` parameters.

    Raises
    ------
    TooLarge
        The message is longer than a model of ``expected_numel`` elements can be.
    PayloadMismatch
        Wrong fingerprint, element count, dtype or data length, or non-finite values.
    ProtocolError
        Anything else malformed.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"model payload must be bytes, got {type(data).__name__}")
    max_data = 4 * expected_numel
    if len(data) > max_data + _OVERHEAD:
        raise TooLarge(f"model payload of {len(data)} bytes exceeds {max_data + _OVERHEAD}")
    body = unpack_limited(bytes(data), max_bin=max(max_data, MAX_FINGERPRINT_BYTES), max_str=8, max_map=8)
    if not (isinstance(body, dict) and body.keys() == _KEYS):
        raise ProtocolError(f"model payload must be a map with keys {sorted(_KEYS)}")
    if body["v"] != VERSION or type(body["v"]) is not int:
        raise ProtocolError(f"unsupported model payload version {body['v']!r}")
    if body["dt"] != DTYPE:
        raise PayloadMismatch(f"dtype {body['dt']!r}, expected {DTYPE!r}")
    if body["fp"] != fingerprint:
        raise PayloadMismatch("model fingerprint differs from ours")
    if body["n"] != expected_numel or type(body["n"]) is not int:
        raise PayloadMismatch(f"element count {body['n']!r}, expected {expected_numel}")
    if not is_counter(body["r"]):
        raise ProtocolError(f"round must be an int in [0, 2**63), got {body['r']!r}")
    raw = body["data"]
    if not isinstance(raw, bytes) or len(raw) != max_data:
        raise PayloadMismatch(f"data must be {max_data} bytes for {expected_numel} elements")
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))  # writable native copy
    if not bool(torch.isfinite(flat).all()):
        raise PayloadMismatch("model payload contains NaN or Inf")
    return ModelPayload(flat=flat, round=body["r"], fingerprint=bytes(fingerprint))
