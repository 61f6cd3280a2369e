"""``powersgd:RANK[:SEED]``: PowerSGD low-rank compression (Vogels et al., NeurIPS 2019).

Each tensor of the layout with two or more dims is viewed as ``M`` of shape ``(n, m) = (shape[0],
prod(shape[1:]))``. If ``min(n, m) > r`` and ``r (n + m) < n m`` it is compressed by one warm-started
power iteration::

    P = M Q;  P = orthonormalise(P)  (Gram-Schmidt);  Q = Mᵀ P;  send P (n×r) and Q (m×r);  M̂ = P Qᵀ

Every other tensor (vectors, biases, tiny or already thin matrices) is sent dense. ``Q`` starts as
a standard normal draw from a ``torch.Generator`` seeded with ``SEED`` (default 0); with a stream
state (:meth:`PowerSGDCodec.new_state`) the ``Q`` computed at one call is the start of the next
(the warm start of the paper), without one each call starts fresh from ``SEED``. Error feedback,
which PowerSGD needs to converge, is :class:`~protocols.codecs.feedback.ErrorFeedback`'s job.

Wire: 16-byte header (param = RANK, 1..255) then, per tensor in layout order, either P then Q
(row-major little-endian float32) or the dense float32 values::

    wire_bytes = 16 + 4 Σ_low-rank r (n + m) + 4 Σ_dense numel

The decoder refuses NaN/Inf in P, Q or the product. For a matrix of rank <= r (and a start ``Q``
not orthogonal to its row space) the reconstruction is exact up to fp32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from protocols.codecs import wire
from protocols.codecs.base import Codec, Layout
from protocols.codecs.terngrad import parse_seed


def low_rank_dims(shape: tuple[int, ...], rank: int) -> tuple[int, int] | None:
    """``(n, m)`` if a tensor of ``shape`` is sent as rank-``rank`` factors, else ``None``."""
    if len(shape) < 2:
        return None
    n, m = shape[0], math.prod(shape[1:])
    return (n, m) if min(n, m) > rank and rank * (n + m) < n * m else None


def orthonormalise(p: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the columns of ``p`` (n × r, n > r) in place by Gram-Schmidt, applied twice.

    A column whose norm drops below ``1e-5`` of its original norm when the previous columns are
    projected out is (numerically) in their span and becomes zero, so ``P Qᵀ`` keeps only the
    directions found; normalising the rounding residue instead would give a spurious direction.
    ``torch.linalg.qr`` gives an orthonormal basis too but costs ~1 ms per small call on CPU.
    ``p`` must be a contiguous CPU float32 tensor.
    """
    a = p.numpy()  # numpy on the same memory: per-op overhead matters for these tiny ops
    original = np.linalg.norm(a, axis=0).tolist()
    for _ in range(2):
        for j in range(a.shape[1]):
            col = a[:, j]
            if j:
                col -= a[:, :j] @ (a[:, :j].T @ col)
            norm = float(np.linalg.norm(col))
            col *= 1.0 / norm if norm > 1e-5 * original[j] and norm > 1e-30 else 0.0
            original[j] = 1.0 if norm > 0 else 0.0  # the second pass starts from unit columns
    return p


@dataclass
class PowerSGDState:
    """Warm-start ``Q`` per tensor (``None`` until the first call, or for dense tensors) and the RNG."""

    seed: int
    q: list[torch.Tensor | None]
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict[str, Any]:
        """``{"seed": int, "q": [Tensor | None], "generator": ByteTensor}`` (tensors cloned)."""
        return {"seed": self.seed, "q": [None if q is None else q.clone() for q in self.q],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same layout)."""
        if len(state["q"]) != len(self.q):
            raise ValueError(f"state has {len(state['q'])} tensors, this stream has {len(self.q)}")
        self.seed = int(state["seed"])
        self.q = [None if q is None else q.clone() for q in state["q"]]
        self.generator.set_state(state["generator"])


class PowerSGDCodec(Codec):
    """Rank-``r`` PowerSGD, fp32 factors; ``wire_bytes = 16 + 4 Σ r(n+m) + 4 Σ dense numel``."""

    name: ClassVar[str] = "powersgd"
    codec_id: ClassVar[int] = 7
    usage: ClassVar[str] = "powersgd:RANK[:SEED]  (RANK in 1..255; SEED a non-negative int, default 0)"

    def __init__(self, rank: int, seed: int = 0) -> None:
        if type(rank) is not int or not 1 <= rank <= 255:
            raise ValueError(f"powersgd rank must be an int in 1..255, got {rank!r}")
        if type(seed) is not int or seed < 0:
            raise ValueError(f"powersgd seed must be a non-negative int, got {seed!r}")
        self.rank, self.seed = rank, seed
        self.spec = f"powersgd:{rank}" + (f":{seed}" if seed else "")

    @classmethod
    def from_args(cls, args: list[str]) -> PowerSGDCodec:
        if not args or not args[0].isdigit():
            raise ValueError(f"usage: {cls.usage}")
        return cls(int(args[0]), parse_seed(cls.usage, args[1:]))

    def new_state(self, layout: Layout) -> PowerSGDState:
        return PowerSGDState(self.seed, [None] * len(layout.shapes))

    def _start(self, state: PowerSGDState | None, i: int, m: int, generator: torch.Generator) -> torch.Tensor:
        if state is not None and state.q[i] is not None:
            return state.q[i]  # type: ignore[return-value]
        return torch.randn(m, self.rank, generator=generator)

    def encode(self, x: torch.Tensor, layout: Layout, state: Any = None) -> bytes:
        wire.check_input(x, layout)
        if state is not None and not (isinstance(state, PowerSGDState)
                                      and len(state.q) == len(layout.shapes)):
            raise ValueError("powersgd needs a PowerSGDState made for this layout")
        generator = state.generator if state is not None else torch.Generator().manual_seed(self.seed)
        if wire.off_host(x):
            return self._encode_off_host(x.detach().contiguous(), layout, state, generator)
        x = wire.to_host(x).detach().contiguous()
        wire.check_finite_input(x.numpy())
        parts: list[Any] = [wire.header(self.codec_id, self.rank, layout)]
        for i, (shape, tensor) in enumerate(zip(layout.shapes, layout.split(x))):
            dims = low_rank_dims(shape, self.rank)
            if dims is None:
                parts.append(wire.to_le_bytes(tensor.reshape(-1).numpy()).data)
                continue
            matrix = tensor.reshape(dims).numpy()  # numpy matmul: ~2x faster than torch on a busy CPU
            start = self._start(state, i, dims[1], generator).numpy()
            p = orthonormalise(torch.from_numpy(matrix @ start))
            q = torch.from_numpy(matrix.T @ p.numpy())
            if state is not None:
                state.q[i] = q
            parts += [wire.to_le_bytes(p.numpy()).data, wire.to_le_bytes(q.numpy()).data]
        return wire.join(*parts)

    def _encode_off_host(self, x: torch.Tensor, layout: Layout, state: PowerSGDState | None,
                         generator: torch.Generator) -> bytes:
        """:meth:`encode` with the products ``M Q`` and ``Mᵀ P`` on the tensor's device.

        The start ``Q`` of every matrix goes there in one copy, every ``P`` comes back in one copy to be
        orthonormalised on the host (tiny n × r work that is all per-column steps), goes back in one,
        and the ``Q`` and the dense tensors come back in one copy each: five transfers per call.
        """
        wire.check_finite_tensor(x)
        tensors = layout.split(x)
        dims = [low_rank_dims(shape, self.rank) for shape in layout.shapes]
        low = [(i, d) for i, d in enumerate(dims) if d is not None]
        starts = _to(x.device, [self._start(state, i, m, generator) for i, (_, m) in low])
        ps = _to(torch.device("cpu"), [tensors[i].reshape(d) @ q for (i, d), q in zip(low, starts)])
        ps_on = _to(x.device, [orthonormalise(p) for p in ps])
        qs = _to(torch.device("cpu"), [tensors[i].reshape(d).T @ p for (i, d), p in zip(low, ps_on)])
        dense = iter(_to(torch.device("cpu"), [t.reshape(-1) for t, d in zip(tensors, dims) if d is None]))
        factors = iter(zip(ps, qs))
        parts: list[Any] = [wire.header(self.codec_id, self.rank, layout)]
        for i, d in enumerate(dims):
            if d is None:
                parts.append(wire.to_le_bytes(next(dense).numpy()).data)
                continue
            p, q = next(factors)
            if state is not None:
                state.q[i] = q.clone()
            parts += [wire.to_le_bytes(p.numpy()).data, wire.to_le_bytes(q.numpy()).data]
        return wire.join(*parts)

    def decode(self, data: bytes, layout: Layout, device: torch.device | str | None = None) -> torch.Tensor:
        view = wire.as_buffer(data)
        wire.check_length(view, self.wire_bytes(layout))
        wire.check_header(view, self.codec_id, self.rank, layout, wire.HEADER_BYTES)
        if device is not None:
            return self._decode_on(torch.device(device), view, layout)
        body_np = wire.le_array(view, "f4", wire.HEADER_BYTES, (len(view) - wire.HEADER_BYTES) // 4)
        wire.check_finite(body_np, "powersgd payload")
        body = torch.from_numpy(body_np.copy())
        out_np = np.empty(layout.numel, dtype=np.float32)
        out = torch.from_numpy(out_np)
        self._expand(body, out, layout)
        wire.check_finite(out_np, "powersgd reconstruction")
        return out

    def _expand(self, body: torch.Tensor, out: torch.Tensor, layout: Layout) -> None:
        """Write into ``out`` what the payload body holds: small tensors as they are, the others as
        ``P Qᵀ`` (overflow gives Inf, which the callers refuse)."""
        pos = 0
        for shape, start, end in zip(layout.shapes, layout.offsets[:-1], layout.offsets[1:]):
            dims = low_rank_dims(shape, self.rank)
            if dims is None:
                out[start:end] = body[pos:pos + end - start]
                pos += end - start
                continue
            (n, m), r = dims, self.rank
            p = body[pos:pos + n * r].reshape(n, r)
            q = body[pos + n * r:pos + (n + m) * r].reshape(m, r)
            torch.mm(p, q.T, out=out[start:end].view(n, m))
            pos += (n + m) * r

    def _decode_on(self, device: torch.device, view: memoryview, layout: Layout) -> torch.Tensor:
        """:meth:`decode` on ``device``: the factors are copied there and multiplied there."""
        body = wire.to_device(view, torch.float32, wire.HEADER_BYTES, (len(view) - wire.HEADER_BYTES) // 4,
                              device)
        wire.check_finite_output(body, "powersgd payload")
        out = torch.empty(layout.numel, dtype=torch.float32, device=device)
        self._expand(body, out, layout)
        wire.check_finite_output(out, "powersgd reconstruction")
        return out

    def wire_bytes(self, layout: Layout) -> int:
        total = 0
        for shape in layout.shapes:
            dims = low_rank_dims(shape, self.rank)
            total += self.rank * (dims[0] + dims[1]) if dims else math.prod(shape)
        return wire.HEADER_BYTES + 4 * total


def _to(device: torch.device, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` (all on one device) copied to ``device`` in one transfer, as contiguous tensors."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
