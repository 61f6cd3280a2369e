"""``p2pnode bench codecs``: wire size, speed and error of every codec, with hivemind as reference.

For each layout (default: ResNet-50's 161 parameter tensors, 25,557,032 elements, from
:func:`protocols.codecs.layouts.resnet50_layout`) and codec, on a seeded standard-normal vector:

* ``bytes``: payload length; ``ratio``: ``4 d / bytes`` (vs raw fp32);
* ``encode_gbs`` / ``decode_gbs``: ``4 d`` bytes of fp32 input over the median wall time of
  ``repeats`` runs after one warm-up (stateless calls: ``state=None``);
* ``rel_error``: ``||x - x̂||₂ / ||x||₂``.

Reference rows ``hivemind:fp16`` and ``hivemind:scaled-fp16`` run hivemind's ``Float16Compression``
and ``ScaledFloat16Compression`` on the same flat tensor (wire size: the serialized protobuf).
``clone_gbs`` (``x.clone()`` read+write as ``4 d / t``) gives the machine's memory bandwidth for scale.

With ``device`` (e.g. ``"cuda"``) the vector lives there: ``encode`` works there and returns host
bytes, ``decode(..., device=device)`` returns a tensor there, and every timed call is bracketed by
``torch.cuda.synchronize`` so that queued kernels are counted; ``clone_gbs`` is then the device's.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from protocols.codecs.base import Layout
from protocols.codecs.layouts import resnet50_layout
from protocols.codecs.registry import make_codec

DEFAULT_SPECS = ("dense", "fp16", "bf16", "int8", "topk:0.01", "topk:0.001", "powersgd:2", "terngrad")
GB = 1e9


def synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """A function that waits for the work queued on ``device`` (a no-op for the CPU)."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        return functools.partial(torch.cuda.synchronize, dev)
    return lambda: None


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call, each between two ``sync``."""
    sync = sync or (lambda: None)
    fn()  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def clone_bandwidth_gbs(d: int, repeats: int = 5, device: torch.device | str | None = None) -> float:
    """``4 d / t`` in GB/s for the median time ``t`` of ``x.clone()`` on a ``d``-element fp32 tensor."""
    x = torch.randn(d, device=device)
    return 4 * d / median_seconds(x.clone, repeats, synchronizer(device)) / GB


def _row(layout_name: str, codec: str, x: torch.Tensor, nbytes: int, t_enc: float, t_dec: float,
         decoded: torch.Tensor) -> dict[str, Any]:
    d = x.numel()
    err = float(torch.linalg.vector_norm(x - decoded) / torch.linalg.vector_norm(x)) if d else 0.0
    return {"layout": layout_name, "numel": d, "codec": codec, "bytes": nbytes,
            "ratio": 4 * d / nbytes, "encode_ms": 1e3 * t_enc, "decode_ms": 1e3 * t_dec,
            "encode_gbs": 4 * d / t_enc / GB, "decode_gbs": 4 * d / t_dec / GB, "rel_error": err}


def _bench_codec(spec: str, layout_name: str, layout: Layout, x: torch.Tensor,
                 repeats: int) -> dict[str, Any]:
    codec = make_codec(spec)
    device = None if x.device.type == "cpu" else x.device  # the host path on the CPU, as nodes use it
    sync = synchronizer(x.device)
    payload = codec.encode(x, layout)
    t_enc = median_seconds(lambda: codec.encode(x, layout), repeats, sync)
    t_dec = median_seconds(lambda: codec.decode(payload, layout, device), repeats, sync)
    return _row(layout_name, spec, x, len(payload), t_enc, t_dec, codec.decode(payload, layout, device))


def _bench_hivemind(layout_name: str, x: torch.Tensor, repeats: int) -> list[dict[str, Any]]:
    try:
        from hivemind.compression import CompressionInfo, Float16Compression, ScaledFloat16Compression
    except ImportError:  # pragma: no cover - hivemind is a dependency of the project
        return []
    info = CompressionInfo.from_tensor(x)
    rows = []
    with warnings.catch_warnings():  # hivemind's extract wraps read-only buffers (torch warns once)
        warnings.simplefilter("ignore", UserWarning)
        for name, comp in (("hivemind:fp16", Float16Compression()),
                           ("hivemind:scaled-fp16", ScaledFloat16Compression())):
            serialized = comp.compress(x, info, allow_inplace=False)
            t_enc = median_seconds(functools.partial(comp.compress, x, info, allow_inplace=False), repeats)
            t_dec = median_seconds(functools.partial(comp.extract, serialized), repeats)
            rows.append(_row(layout_name, name, x, len(serialized.SerializeToString()), t_enc, t_dec,
                             comp.extract(serialized)))
    return rows


def machine_info() -> dict[str, Any]:
    """CPU, core and thread counts, the CUDA device if any, and library versions, for the result header."""
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda_device": cuda, "cuda_runtime": torch.version.cuda}


def bench_codecs(specs: Sequence[str] | None = None, *, sizes: dict[str, int] | None = None,
                 layouts: dict[str, Layout] | None = None, repeats: int = 5, threads: int | None = None,
                 progress: Callable[[str], None] | None = None, hivemind: bool = True,
                 seed: int = 0, device: torch.device | str | None = None) -> dict[str, Any]:
    """Measure every codec in ``specs`` on every layout; return ``{"machine", "clone_gbs", "rows"}``.

    Parameters
    ----------
    specs
        Codec specs (default :data:`DEFAULT_SPECS`).
    sizes
        Extra flat layouts by name: ``{"flat-1M": 1_000_000}`` becomes ``Layout.flat(1_000_000)``.
    layouts
        Layouts by name (the caller passes e.g. the fashion-MNIST CNN's ``Layout.of(model)``).
        If neither ``sizes`` nor ``layouts`` is given: ``{"resnet50": resnet50_layout()}``.
    repeats
        Timed runs per measure (median taken) after one warm-up.
    threads
        ``torch.set_num_threads`` for the run (restored afterwards); default: leave as is.
    progress
        Called with a short message before each row.
    hivemind
        Add the hivemind float16 reference rows for each layout.
    seed
        Seed of the standard-normal test vector.
    device
        Where the vector lives and the codecs work (default: the CPU, host paths); see the module doc.

    Raises
    ------
    ValueError
        A bad codec spec, or ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    specs = list(DEFAULT_SPECS if specs is None else specs)
    for spec in specs:
        make_codec(spec)  # fail fast on a bad spec
    todo = dict(layouts or {})
    todo.update({name: Layout.flat(d) for name, d in (sizes or {}).items()})
    if not todo:
        todo = {"resnet50": resnet50_layout()}
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows: list[dict[str, Any]] = []
        for layout_name, layout in todo.items():
            x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(seed)).to(device or "cpu")
            for spec in specs:
                if progress is not None:
                    progress(f"{layout_name}: {spec}")
                rows.append(_bench_codec(spec, layout_name, layout, x, repeats))
            if hivemind and x.device.type == "cpu":  # hivemind's compressors are host code
                if progress is not None:
                    progress(f"{layout_name}: hivemind reference")
                rows += _bench_hivemind(layout_name, x, repeats)
        biggest = max(layout.numel for layout in todo.values())
        return {"machine": machine_info(), "clone_gbs": clone_bandwidth_gbs(biggest, repeats, device),
                "clone_numel": biggest, "repeats": repeats, "device": str(torch.device(device or "cpu")),
                "rows": rows}
    finally:
        torch.set_num_threads(old_threads)


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of :func:`bench_codecs`' rows, with the clone bandwidth and machine below."""
    lines = ["| layout | codec | bytes | ratio vs fp32 | encode GB/s | decode GB/s | rel. L2 error |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['layout']} | {r['codec']} | {r['bytes']:,} | {r['ratio']:.1f}× | "
                     f"{r['encode_gbs']:.2f} | {r['decode_gbs']:.2f} | {r['rel_error']:.2e} |")
    m = result["machine"]
    lines += ["", f"x.clone() on {result['clone_numel']:,} fp32: {result['clone_gbs']:.2f} GB/s; "
              f"median of {result['repeats']} runs; {m['processor']}, {m['cpu_count']} CPUs, "
              f"{m['torch_threads']} torch threads, torch {m['torch']}, numpy {m['numpy']}"]
    return "\n".join(lines)
