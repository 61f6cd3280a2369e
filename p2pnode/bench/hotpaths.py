"""``p2pnode bench hotpaths``: every hot path beside what the machine allows, in one run (issue 8).

- Memory bandwidth: ``x.clone()`` of a 25.6M-element fp32 tensor (median of the repeats), measured
  before and after the codecs; the codecs' encode and decode throughput is quoted as a fraction of it.
- Merge rules on a pre-stacked ``(n, d)`` input: every rule beside two references, ``torch.cdist`` of all
  pairs plus a mean, and NNA's arithmetic floor (the n distances from the own row plus a mean).
- Ed25519: sealing (serialise + sign) and opening (verify + parse) an envelope, per MB of payload and for an
  empty one, beside SHA-512 over the same bytes (envelope version 2's floor: its signing hashed the
  message twice with it, verifying once; version 3 signs a SHA-256 digest), and whether sealing and
  opening hold the interpreter lock (:func:`spinner_kept`).
- Small-RPC latency under load (:mod:`p2pnode.bench.rpc_latency`): a client pings a node that trains
  flat out (``p2pnode run``, real libp2p), at a fixed rate; p50/p99/max of the round trips.

Everything but the RPC part runs in this process with ``--threads`` torch threads.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from protocols.codecs.bench import bench_codecs, clone_bandwidth_gbs, machine_info, median_seconds

logger = logging.getLogger(__name__)

GB, MB = 1e9, 1e6
LOCK_RATE = 100.0  # seals + opens a second while a Python thread spins (4 exchanges per 40 ms round)
LOCK_SECONDS = 3.0


@dataclass(kw_only=True, slots=True)
class HotpathOptions:
    """What ``p2pnode bench hotpaths`` measures."""

    d: int = 25_557_032  # elements of the codec vector and of each stacked row (ResNet-50 size)
    n: int = 16  # rows of the merge input (own included)
    repeats: int = 5  # timed runs per measure after a warm-up; the median is reported
    threads: int = 1  # torch threads of this process
    codecs: tuple[str, ...] = ("dense", "fp16", "bf16", "int8")
    envelope_mb: tuple[float, ...] = (0.456, 1.0, 16.0)  # payloads sealed and opened (plus an empty one);
    # 0.456 MB: the flat model of the GPU bench's CNN (114k fp32)
    rpc_seconds: float = 30.0  # how long the pinger runs against a training node (0: skip that part)
    rpc_rate: float = 20.0  # pings per second
    rpc_task: str = "fashion-mnist"  # what the pinged node trains
    rpc_worker_nice: int | None = None  # the nodes' --worker-nice (None: their default)
    out_dir: Path = Path("runs/bench-hotpaths")
    json_path: Path | None = Path("runs/bench-hotpaths.json")
    merge_rules: bool = True  # time the merge rules (needs n × d × 4 bytes plus working memory)
    parts: tuple[str, ...] = ("codecs", "merge", "envelopes", "rpc")  # what runs (rpc needs rpc_seconds > 0)

    def __post_init__(self) -> None:
        if self.d < 1 or self.n < 9 or self.repeats < 1 or self.threads < 1:
            raise ValueError(f"need d >= 1, n >= 9 (F = 3), repeats >= 1, threads >= 1; got {self.d}, "
                             f"{self.n}, {self.repeats}, {self.threads}")
        if not set(self.parts) <= {"codecs", "merge", "envelopes", "rpc"}:
            raise ValueError(f"parts must be among codecs, merge, envelopes, rpc; got {self.parts}")
        if self.rpc_seconds < 0 or self.rpc_rate <= 0:
            raise ValueError(f"rpc_seconds must be >= 0 and rpc_rate > 0, got {self.rpc_seconds}, "
                             f"{self.rpc_rate}")


def codec_rows(opts: HotpathOptions, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each codec's (and hivemind's float16 ones') encode and decode GB/s on the flat ``d`` vector."""
    result = bench_codecs(opts.codecs, sizes={f"flat-{opts.d}": opts.d}, repeats=opts.repeats, hivemind=True,
                          progress=progress)
    return list(result["rows"])


def merge_rows(opts: HotpathOptions, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every merge rule and the two references on one pre-stacked ``(n, d)`` standard-normal input."""
    from p2pnode.bench.defenses import time_rules

    progress(f"merge rules on a ({opts.n}, {opts.d}) stack")
    x = torch.randn(opts.n, opts.d, generator=torch.Generator().manual_seed(1))  # (n, d)
    try:
        rows = time_rules(x, opts.repeats)
    finally:
        del x
    by_rule = {row["rule"]: row for row in rows}
    floor = by_rule["nna-floor"]["median_s"]
    pairwise = by_rule["cdist+mean"]["median_s"]
    for row in rows:
        if row["median_s"] is not None:
            row["vs_nna_floor"] = row["median_s"] / floor
            row["vs_cdist_mean"] = row["median_s"] / pairwise
    return rows


def spinner_kept(work: Callable[[], object], *, rate: float, seconds: float) -> float:
    """Share of its solo rate that a pure-Python thread keeps while this thread runs ``work`` ``rate``
    times a second (paced by sleeps): what a Python-bound training thread, e.g. one launching GPU kernels,
    keeps beside the exchanges. 1.0: ``work`` never holds the interpreter lock."""
    import threading

    def spin_for(busy: Callable[[], None]) -> float:
        stop, count = threading.Event(), [0]

        def spin() -> None:
            n = 0
            while not stop.is_set():
                for _ in range(1000):
                    n += 1
                count[0] = n

        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
        time.sleep(0.05)
        c0, t0 = count[0], time.perf_counter()
        busy()
        c1, t1 = count[0], time.perf_counter()
        stop.set()
        thread.join()
        return (c1 - c0) / (t1 - t0)

    def paced() -> None:
        period, start = 1.0 / rate, time.perf_counter()
        for k in range(int(seconds * rate)):
            work()
            time.sleep(max(0.0, start + (k + 1) * period - time.perf_counter()))

    solo = spin_for(lambda: time.sleep(seconds))
    return spin_for(paced) / solo


def envelope_rows(opts: HotpathOptions) -> list[dict[str, Any]]:
    """Seal and open an envelope of each payload size; per-MB costs beside SHA-512 over the same bytes.

    For sizes up to 1 MB, also what a pure-Python thread keeps of its speed while this thread seals and
    opens :data:`LOCK_RATE` envelopes a second (:func:`spinner_kept`), beside version 2's rule (Ed25519
    sign and verify over the bytes themselves): does the envelope hold the interpreter lock that a
    training thread needs?
    """
    from p2pnode.identity import Identity
    from protocols.envelope import SIGNATURE_BYTES, open_envelope, seal

    signer, seq = Identity.generate(), itertools.count(1)
    rows = []
    for size_mb in (0.0, *opts.envelope_mb):
        payload = bytes(int(size_mb * MB))  # zeros: the cost does not depend on the bytes
        sealed = seal(signer, kind="push", swarm="bench", round=1, seq=1, payload=payload)
        limit = len(sealed) + 1

        def do_seal(payload: bytes = payload) -> bytes:
            return seal(signer, kind="push", swarm="bench", round=1, seq=next(seq), payload=payload)

        def do_open(sealed: bytes = sealed, limit: int = limit) -> object:
            return open_envelope(sealed, max_bytes=limit, swarm="bench")

        def v2_rule(signed: bytes = sealed[:-SIGNATURE_BYTES]) -> None:  # sign + verify the bytes themselves
            signer.private_key.public_key().verify(signer.sign(signed), signed)

        repeats = opts.repeats if size_mb else 200
        t_seal, t_open = median_seconds(do_seal, repeats), median_seconds(do_open, repeats)
        t_hash = median_seconds(functools.partial(hashlib.sha512, payload), repeats)
        row: dict[str, Any] = {"payload_mb": size_mb, "envelope_bytes": len(sealed), "seal_ms": 1e3 * t_seal,
                               "open_ms": 1e3 * t_open, "sha512_ms": 1e3 * t_hash}
        if size_mb:
            t_v2 = median_seconds(v2_rule, repeats)
            row |= {"seal_ms_per_mb": row["seal_ms"] / size_mb, "open_ms_per_mb": row["open_ms"] / size_mb,
                    "sha512_ms_per_mb": row["sha512_ms"] / size_mb,
                    "v2_sign_verify_ms_per_mb": 1e3 * t_v2 / size_mb}
            if size_mb <= 1.0:  # at 16 MB a hundred a second would not fit in a second
                row["python_thread_kept"] = spinner_kept(lambda: do_open(do_seal()), rate=LOCK_RATE,
                                                         seconds=LOCK_SECONDS)
                row["python_thread_kept_v2_rule"] = spinner_kept(v2_rule, rate=LOCK_RATE,
                                                                 seconds=LOCK_SECONDS)
        rows.append(row)
    return rows


def run_hotpath_bench(opts: HotpathOptions, *,
                      progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run every part (in this order: clone, codecs, clone again, merge rules, envelopes, RPC)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        clones: list[float] = []
        codecs: list[dict[str, Any]] = []
        if "codecs" in opts.parts:
            progress("clone() bandwidth")
            clones.append(clone_bandwidth_gbs(opts.d, opts.repeats))
            progress("codecs")
            codecs = codec_rows(opts, progress)
            clones.append(clone_bandwidth_gbs(opts.d, opts.repeats))
        clone_gbs = statistics.median(clones) if clones else None
        for row in codecs:  # against the median of the two clone measurements around them
            row["encode_vs_clone"] = row["encode_gbs"] / clone_gbs
            row["decode_vs_clone"] = row["decode_gbs"] / clone_gbs
        merges = merge_rows(opts, progress) if opts.merge_rules and "merge" in opts.parts else []
        progress("envelopes")
        envelopes = envelope_rows(opts) if "envelopes" in opts.parts else []
        machine = machine_info()
    finally:
        torch.set_num_threads(old_threads)
    rpc = None
    if opts.rpc_seconds > 0 and "rpc" in opts.parts:
        from p2pnode.bench.rpc_latency import run_rpc_latency

        rpc = run_rpc_latency(seconds=opts.rpc_seconds, rate=opts.rpc_rate, task=opts.rpc_task,
                              out_dir=opts.out_dir, worker_nice=opts.rpc_worker_nice, progress=progress)
    result = {"options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
              "machine": machine, "clone_gbs": clone_gbs, "clone_gbs_runs": clones, "codecs": codecs,
              "merge_rules": merges, "envelopes": envelopes, "rpc": rpc,
              "checks": checks(codecs, merges, rpc),
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def checks(codecs: Sequence[dict[str, Any]], merges: Sequence[dict[str, Any]],
           rpc: dict[str, Any] | None) -> dict[str, Any]:
    """Issue 8's hot-path lines: fp16 and int8 >= 50% of clone() both ways, NNA <= 1.5x its floor and
    p99 ping latency < 50 ms."""
    out: dict[str, Any] = {}
    for row in codecs:
        if row["codec"] in ("fp16", "int8"):
            worst = min(row["encode_vs_clone"], row["decode_vs_clone"])
            out[f"{row['codec']}_min_fraction_of_clone"] = worst
            out[f"{row['codec']}_met"] = worst >= 0.5
    nna = [r for r in merges if r["rule"].startswith("nna:") and r.get("vs_nna_floor") is not None]
    if nna:
        out["nna_vs_floor"] = nna[0]["vs_nna_floor"]
        out["nna_met"] = nna[0]["vs_nna_floor"] <= 1.5
    if rpc is not None and rpc.get("p99_ms") is not None:
        out["rpc_p99_ms"] = rpc["p99_ms"]
        out["rpc_met"] = rpc["p99_ms"] < 50.0
    return out


def format_report(result: dict[str, Any]) -> str:
    """The tables of one run, as Markdown."""
    lines = []
    if result["codecs"]:
        lines += [f"clone() of {result['options']['d']:,} fp32: {result['clone_gbs']:.2f} GB/s "
                  f"(runs {', '.join(f'{g:.2f}' for g in result['clone_gbs_runs'])})", "",
                  "| codec | bytes | encode GB/s | × clone | decode GB/s | × clone |",
                  "|---|---:|---:|---:|---:|---:|"]
    for r in result["codecs"]:
        lines.append(f"| {r['codec']} | {r['bytes']:,} | {r['encode_gbs']:.2f} | "
                     f"{r['encode_vs_clone']:.2f} | {r['decode_gbs']:.2f} | {r['decode_vs_clone']:.2f} |")
    if result["merge_rules"]:
        lines += ["", "| merge rule | median | × NNA floor | × cdist+mean |", "|---|---:|---:|---:|"]
        for r in result["merge_rules"]:
            if r["median_s"] is None:
                lines.append(f"| {r['rule']} | {r.get('error', 'failed')} | | |")
                continue
            lines.append(f"| {r['rule']} | {r['median_s']:.3f} s | {r['vs_nna_floor']:.2f} | "
                         f"{r['vs_cdist_mean']:.3f} |")
    if result["envelopes"]:
        lines += ["", f"| envelope payload | seal | open | version 2's rule: sign + verify the bytes | "
                      f"SHA-512 of the payload | a Python thread keeps, {LOCK_RATE:g} seal+open/s | "
                      "the same, version 2's rule |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["envelopes"]:
        kept = (f"{r['python_thread_kept']:.3f} | {r['python_thread_kept_v2_rule']:.3f}"
                if "python_thread_kept" in r else " | ")
        if r["payload_mb"]:
            lines.append(f"| {r['payload_mb']:g} MB | {r['seal_ms_per_mb']:.2f} ms/MB | "
                         f"{r['open_ms_per_mb']:.2f} ms/MB | {r['v2_sign_verify_ms_per_mb']:.2f} ms/MB | "
                         f"{r['sha512_ms_per_mb']:.2f} ms/MB | {kept} |")
        else:
            lines.append(f"| empty ({r['envelope_bytes']} B) | {1e3 * r['seal_ms']:.0f} µs | "
                         f"{1e3 * r['open_ms']:.0f} µs | | | | |")
    rpc = result.get("rpc")
    if rpc:
        lines += ["", f"ping round trips to a node training flat out ({rpc['task']}): {rpc['answered']} of "
                      f"{rpc['sent']} answered; p50 {rpc['p50_ms']:.1f} ms, p99 {rpc['p99_ms']:.1f} ms, "
                      f"max {rpc['max_ms']:.1f} ms; the node made {rpc['rounds_during']} rounds meanwhile",
                  f"the same pings to the idle target (the floor): p50 {rpc['idle']['p50_ms']:.1f} ms, "
                  f"p99 {rpc['idle']['p99_ms']:.1f} ms, max {rpc['idle']['max_ms']:.1f} ms"]
    lines += ["", "checks: " + json.dumps(result["checks"])]
    return "\n".join(lines)
