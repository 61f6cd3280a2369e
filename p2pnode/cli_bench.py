"""``p2pnode bench …``: the benchmark subcommands (kept apart from the daemon's own CLI)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def _csv(kind: type) -> Any:
    """Comma-separated values; a comma before a digit stays inside a spec (``multi-krum:2,4``)."""
    def parse(text: str) -> tuple[Any, ...]:
        try:
            parts = re.split(r",(?=[A-Za-z])", text) if kind is str else text.split(",")
            return tuple(kind(x) for x in parts if x)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def add_bench(sub: Any) -> None:
    """Register the ``bench …`` subcommands on the top-level subparsers."""
    bench = sub.add_parser("bench", help="benchmarks (robustness matrix, defense timings)",
                           description="Benchmarks whose figures go into BENCHMARKS.md.", allow_abbrev=False)
    which = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)

    from p2pnode.bench.robustness import RobustnessOptions

    d = RobustnessOptions()
    p = which.add_parser("robustness", allow_abbrev=False,
                         help="attack x defense matrix and the Sybil table (in-process swarms)",
                         description="Each cell is an in-process swarm of the daemon's Node code on "
                                     "fashion-mnist, Dirichlet(1): honest mean/min accuracy per cell, "
                                     "and the targeted 0->1 success for 1, 5, 15 Sybils. "
                                     "Resumes from --json.")
    p.add_argument("--honest", type=int, default=d.honest, help=f"honest nodes (default {d.honest})")
    p.add_argument("--byzantine", type=int, default=d.byzantine,
                   help=f"attackers per cell (default {d.byzantine})")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"rounds per cell (default {d.rounds})")
    p.add_argument("--fanout", type=int, default=d.fanout, help=f"peers per round (default {d.fanout})")
    p.add_argument("--local-steps", type=int, default=d.local_steps,
                   help=f"H (default {d.local_steps})")
    p.add_argument("--f", type=int, default=d.f, help=f"F of the F-rules (default {d.f})")
    p.add_argument("--task", default=d.task, help=f"task (default {d.task})")
    p.add_argument("--partition", default=d.partition, help=f"partition (default {d.partition})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help="clip each local step's gradient to this L2 norm (default 0 = off)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help=f"cells run in parallel (default {d.workers})")
    p.add_argument("--attacks", type=_csv(str), default=d.attacks, help="comma-separated matrix rows")
    p.add_argument("--defenses", type=_csv(str), default=d.defenses,
                   help="comma-separated matrix columns ({f} and {m} are filled in)")
    p.add_argument("--sybils", type=_csv(int), default=d.sybil_counts, help="Sybil counts (default 1,5,15)")
    p.add_argument("--sybil-defenses", type=_csv(str), default=d.sybil_defenses, help="Sybil table columns")
    p.add_argument("--json", type=Path, default=d.json_path, help=f"results file (default {d.json_path})")
    p.add_argument("--plot", type=Path, default=None, help="heat map PNG of the matrix")

    from p2pnode.bench.variance import VarianceOptions

    v = VarianceOptions()
    p = which.add_parser("variance", allow_abbrev=False,
                         help="rounds to a target accuracy, mean vs mean + variance correction",
                         description="In-process swarms from independent random initialisations: the "
                                     "first round whose honest mean accuracy reaches --target, per seed, "
                                     "with and without --variance-correction (median over seeds).")
    p.add_argument("--nodes", type=int, default=v.nodes, help=f"nodes (default {v.nodes})")
    p.add_argument("--rounds", type=int, default=v.rounds, help=f"rounds (default {v.rounds})")
    p.add_argument("--fanout", type=int, default=v.fanout, help=f"peers per round (default {v.fanout})")
    p.add_argument("--local-steps", type=int, default=v.local_steps, help=f"H (default {v.local_steps})")
    p.add_argument("--task", default=v.task, help=f"task (default {v.task})")
    p.add_argument("--target", type=float, default=v.target, help=f"target accuracy (default {v.target})")
    p.add_argument("--seeds", type=_csv(int), default=v.seeds, help="seeds (default 0,1,2)")
    p.add_argument("--json", type=Path, default=v.json_path, help=f"results file (default {v.json_path})")
    p.add_argument("--plot", type=Path, default=v.plot_path, help=f"plot (default {v.plot_path})")

    from p2pnode.bench.bristle import BristleOptions

    b = BristleOptions()
    p = which.add_parser("bristle", allow_abbrev=False, help="Bristle vs mean under label flipping",
                         description="fashion-mnist-transfer, non-IID Dirichlet split, some nodes flip every "
                                     "label: honest accuracy with and without the attackers, per defense.")
    p.add_argument("--nodes", type=int, default=b.nodes, help=f"nodes (default {b.nodes})")
    p.add_argument("--byzantine", type=int, default=b.byzantine,
                   help=f"label flippers (default {b.byzantine})")
    p.add_argument("--rounds", type=int, default=b.rounds, help=f"rounds (default {b.rounds})")
    p.add_argument("--fanout", type=int, default=b.fanout,
                   help=f"peers per round = Bristle's K (default {b.fanout})")
    p.add_argument("--partition", default=b.partition, help=f"partition (default {b.partition})")
    p.add_argument("--defenses", type=_csv(str), default=b.defenses, help="defenses (default bristle,mean)")
    p.add_argument("--json", type=Path, default=b.json_path, help=f"results file (default {b.json_path})")

    p = which.add_parser("defenses", allow_abbrev=False, help="time every merge rule against byzfl",
                         description="Time each rule at n inputs and each d, on CPU (and CUDA when present), "
                                     "with byzfl's equivalents in the same run.")
    p.add_argument("--n", type=int, default=16, help="inputs per merge (default 16)")
    p.add_argument("--dims", type=_csv(int), default=(1_000_000, 25_600_000), help="vector lengths")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per rule (median reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads during the run (default 1: stable on a shared machine)")
    p.add_argument("--json", type=Path, default=Path("runs/bench-defenses.json"), help="results file")


    p = which.add_parser("codecs", allow_abbrev=False, help="wire size, speed and error of every codec",
                         description="Every codec on a ResNet-50-sized layout (25,557,032 fp32 elements) "
                                     "and on the fashion-mnist CNN: bytes on the wire, ratio vs fp32, "
                                     "encode/decode GB/s of fp32 input (median after a warm-up), relative L2 "
                                     "error; hivemind's Float16 and ScaledFloat16 as references.")
    p.add_argument("--codecs", type=_csv(str), default=None, help="codecs (default: all, with standard args)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per codec (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads during the run (default 1)")
    p.add_argument("--json", type=Path, default=Path("runs/bench-codecs.json"), help="results file")

    from p2pnode.bench.codec_swarm import CodecSwarmOptions

    c = CodecSwarmOptions()
    p = which.add_parser("codec-swarm", allow_abbrev=False, help="one real swarm per codec: accuracy, bytes",
                         description="`p2pnode swarm` once per codec (real processes, libp2p, DHT), "
                                     "everything else equal: honest accuracy, bytes per node, wall time.")
    p.add_argument("--nodes", type=int, default=c.nodes, help=f"nodes (default {c.nodes})")
    p.add_argument("--rounds", type=int, default=c.rounds, help=f"rounds (default {c.rounds})")
    p.add_argument("--task", default=c.task, help=f"task (default {c.task})")
    p.add_argument("--fanout", type=int, default=c.fanout, help=f"peers per round (default {c.fanout})")
    p.add_argument("--seed", type=int, default=c.seed, help=f"seed of every swarm (default {c.seed})")
    p.add_argument("--mode", choices=("gossip", "increments"), default=c.mode,
                   help=f"what every node exchanges (see `p2pnode run --mode`; default {c.mode})")
    p.add_argument("--codecs", type=_csv(str), default=c.codecs,
                   help="codecs (default: " + ",".join(c.codecs) + ")")
    p.add_argument("--out-dir", type=Path, default=c.out_dir, help=f"swarm outputs (default {c.out_dir})")
    p.add_argument("--json", type=Path, default=c.json_path, help=f"results file (default {c.json_path})")


    add_gpu_bench(which)
    add_fuzz_bench(which)
    add_e2e_bench(which)
    add_partition_bench(which)
    add_hotpaths_bench(which)

    from p2pnode.bench.churn import ChurnOptions

    ch = ChurnOptions()
    p = which.add_parser("churn", allow_abbrev=False,
                         help="an undisturbed swarm vs one losing and gaining nodes",
                         description="Real processes: the same swarm undisturbed and with --killed nodes "
                                     "SIGKILLed at --kill-at and --joiners new nodes started at --join-at: "
                                     "longest survivor round after the kill, final honest accuracy of both, "
                                     "joiners' accuracy at their 5th round against the swarm's.")
    for name in ("nodes", "killed", "joiners", "rounds", "kill_at", "join_at", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(ch, name),
                       help=f"default {getattr(ch, name)}")
    p.add_argument("--task", default=ch.task, help=f"task (default {ch.task})")
    p.add_argument("--heartbeat-s", type=float, default=ch.heartbeat_s, help=f"default {ch.heartbeat_s}")
    p.add_argument("--out-dir", type=Path, default=ch.out_dir, help=f"swarm outputs (default {ch.out_dir})")
    p.add_argument("--json", type=Path, default=ch.json_path, help=f"results file (default {ch.json_path})")

    from p2pnode.bench.mqtt import MqttBenchOptions

    m = MqttBenchOptions()
    p = which.add_parser("mqtt", allow_abbrev=False,
                         help="round time with telemetry off, broker up, broker down",
                         description="The same real swarm without --mqtt, with a running mosquitto, and with "
                                     "the broker stopped (nodes keep retrying), interleaved --repeats times: "
                                     "median round time of each and the ratios down/up and up/off.")
    for name in ("nodes", "rounds", "local_steps", "repeats", "skip"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(m, name),
                       help=f"default {getattr(m, name)}")
    p.add_argument("--task", default=m.task, help=f"task (default {m.task})")
    p.add_argument("--telemetry-interval", type=float, default=m.telemetry_interval,
                   help=f"nodes' --telemetry-interval (default {m.telemetry_interval})")
    p.add_argument("--out-dir", type=Path, default=m.out_dir, help=f"swarm outputs (default {m.out_dir})")
    p.add_argument("--json", type=Path, default=m.json_path, help=f"results file (default {m.json_path})")

    from p2pnode.bench.spsa import SpsaBenchOptions

    o = SpsaBenchOptions()
    p = which.add_parser("spsa", allow_abbrev=False, help="one-byte SPSA swarm vs single-node MeZO",
                         description="An in-process --mode spsa swarm (plus a node joining mid-run) against "
                                     "one node running as many perturbations: wire bytes per delivered "
                                     "scalar, held-out loss per perturbation (plot), model agreement.")
    for name in ("nodes", "rounds", "local_steps", "k", "batch_size", "fanout", "drain_rounds", "join_round",
                 "join_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(o, name),
                       help=f"default {getattr(o, name)}")
    for name in ("lr", "eps"):
        p.add_argument("--" + name, type=float, default=getattr(o, name), help=f"default {getattr(o, name)}")
    p.add_argument("--task", default=o.task, help=f"task (default {o.task})")
    p.add_argument("--json", type=Path, default=o.json_path, help=f"results file (default {o.json_path})")
    p.add_argument("--plot", type=Path, default=o.plot_path, help=f"plot (default {o.plot_path})")
    p.add_argument("--seed", type=int, default=o.seed, help=f"default {o.seed}")
    p.add_argument("--lockstep", action="store_true",
                   help="run the swarm's rounds in step (default: every node runs its rounds freely)")
    p.add_argument("--runs", default=",".join(o.runs),
                   help="which runs: swarm (bytes, loss, agreement), single (MeZO reference), join "
                        f"(default {','.join(o.runs)})")


def add_gpu_bench(which: Any) -> None:
    """Register ``bench gpu``."""
    from p2pnode.bench.gpu import GpuBenchOptions

    g = GpuBenchOptions()
    p = which.add_parser("gpu", allow_abbrev=False,
                         help="gossip cost on the device; codec and merge-rule throughput there",
                         description="Local SGD steps/s per node of an in-process swarm sharing the "
                                     "device, with gossip off (fanout 0) and on (fanout k, --overlap), and "
                                     "the gossip cost 1 - on/off; every codec's encode/decode GB/s on a "
                                     "device tensor (clone() as reference); every merge rule on an (n=16, d) "
                                     "stack there.")
    p.add_argument("--device", default=g.device, help=f"auto | cpu | cuda | cuda:N (default {g.device})")
    p.add_argument("--nodes", type=int, default=g.nodes, help=f"nodes sharing the device (default {g.nodes})")
    p.add_argument("--rounds", type=int, default=g.rounds, help=f"rounds per swarm (default {g.rounds})")
    p.add_argument("--warmup-rounds", type=int, default=g.warmup_rounds,
                   help=f"first rounds left out of the timing (default {g.warmup_rounds})")
    p.add_argument("--local-steps", type=int, default=g.local_steps, help=f"H (default {g.local_steps})")
    p.add_argument("--fanout", type=int, default=g.fanout,
                   help=f"peers per round, gossip on (default {g.fanout})")
    p.add_argument("--trials", type=int, default=g.trials,
                   help=f"off/on swarm pairs, alternating (default {g.trials})")
    p.add_argument("--task", default=g.task, help=f"task (default {g.task})")
    p.add_argument("--data-dir", default=g.data_dir, help="the task's data files (default: its own location)")
    p.add_argument("--repeats", type=int, default=g.repeats,
                   help=f"timed codec and rule calls, median reported (default {g.repeats})")
    p.add_argument("--numel", type=int, default=g.numel,
                   help=f"elements of the codec vector and of each rule input (default {g.numel:,})")
    p.add_argument("--codecs", type=_csv(str), default=g.codecs,
                   help="codecs (default: " + ",".join(g.codecs) + ")")
    p.add_argument("--schedule", choices=("free", "lockstep"), default=g.schedule,
                   help="free: each node runs its own round loop, as separate daemons do; lockstep: round "
                        f"r+1 starts when every node has finished round r (default {g.schedule})")
    p.add_argument("--sections", type=_csv(str), default=g.sections,
                   help="what to run, among throughput, processes (the throughput pair with one daemon "
                        "process per node: libp2p on loopback), processes-train (the same with each "
                        "daemon's training in a child process: --train-process), codecs, rules (default "
                        + ",".join(g.sections) + ")")
    p.add_argument("--json", type=Path, default=g.json_path, help=f"results file (default {g.json_path})")


def add_e2e_bench(which: Any) -> None:
    """Register ``bench e2e``."""
    from p2pnode.bench.e2e import E2EOptions

    e = E2EOptions()
    p = which.add_parser("e2e", allow_abbrev=False,
                         help="p2pnode gossip vs a hivemind averager swarm: time to target, bytes",
                         description="Real multi-process swarms on this machine, same model, shards and "
                                     "local steps: a hivemind baseline (local SGD + averager.step() "
                                     "all-reduce in a group of all nodes) and p2pnode gossip per codec. "
                                     "Per system: time to "
                                     "--target mean held-out accuracy, final accuracy, bytes sent per node "
                                     "(at the transport), CPU seconds; median of --repeats runs. Resumes "
                                     "from --json.")
    for name in ("nodes", "rounds", "local_steps", "fanout", "repeats", "seed", "eval_samples"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(e, name),
                       help=f"default {getattr(e, name)}")
    p.add_argument("--task", default=e.task, help=f"task (default {e.task})")
    p.add_argument("--target", type=float, default=e.target,
                   help=f"mean held-out accuracy to reach (default {e.target})")
    p.add_argument("--matchmaking-s", type=float, default=e.matchmaking_s,
                   help=f"hivemind averager's min_matchmaking_time (default {e.matchmaking_s})")
    p.add_argument("--systems", type=_csv(str), default=e.systems,
                   help="hivemind | CODEC (gossip) | increments/CODEC, each p2pnode one optionally "
                        "@K for fanout K (dense@7), comma-separated "
                        "(default: " + ",".join(e.systems) + ")")
    p.add_argument("--out-dir", type=Path, default=e.out_dir, help=f"swarm outputs (default {e.out_dir})")
    p.add_argument("--json", type=Path, default=e.json_path, help=f"results file (default {e.json_path})")
    p.add_argument("--reanalyze", action="store_true",
                   help="recompute --json from its runs' metrics files (e.g. with another --target), running "
                        "nothing")


def run_e2e_bench_cli(ns: argparse.Namespace) -> int:
    from p2pnode.bench.e2e import E2EOptions, format_table, reanalyze, run_e2e_bench

    names = ("nodes", "rounds", "local_steps", "fanout", "repeats", "seed", "eval_samples", "task", "target",
             "matchmaking_s", "systems")
    try:
        opts = E2EOptions(**{n: getattr(ns, n) for n in names}, out_dir=ns.out_dir, json_path=ns.json)
    except ValueError as exc:
        print(f"p2pnode bench e2e: {exc}", file=sys.stderr)
        return 2

    def progress(row: dict[str, Any]) -> None:
        brief = {k: v for k, v in row.items() if k != "curve"}
        print(json.dumps(brief), file=sys.stderr, flush=True)

    data = reanalyze(opts) if ns.reanalyze else run_e2e_bench(opts, on_run=progress)
    print(format_table(data))
    print(f"results: {ns.json}")
    return 0


def add_fuzz_bench(which: Any) -> None:
    """Register ``bench fuzz``."""
    from p2pnode.bench.fuzz import FuzzOptions

    f = FuzzOptions()
    p = which.add_parser("fuzz", allow_abbrev=False,
                         help="fuzzed messages against a live node: it must refuse them and keep training",
                         description="Starts two `p2pnode run` nodes (digits) on loopback and sends "
                                     "--messages fuzzed messages (structure-aware mutations of signed "
                                     "envelopes and model payloads, random bytes, bad frames) to one of them "
                                     "over libp2p from --lanes hosts of this process. Checks: the node never "
                                     "crashed or restarted, every message got the typed answer it was built "
                                     "for, no send hung, messages_rejected counted every refusal, rounds "
                                     "kept coming.")
    p.add_argument("--messages", type=int, default=f.messages,
                   help=f"messages to send (default {f.messages:,})")
    p.add_argument("--lanes", type=int, default=f.lanes, help=f"concurrent senders (default {f.lanes})")
    p.add_argument("--seed", type=int, default=f.seed, help=f"seed of the messages (default {f.seed})")
    p.add_argument("--timeout-s", type=float, default=f.timeout_s,
                   help=f"deadline of one send; reaching it is a hang (default {f.timeout_s})")
    p.add_argument("--rate", type=float, default=f.rate, help="most messages per second (default 0: none)")
    p.add_argument("--out-dir", type=Path, default=f.out_dir, help=f"node files (default {f.out_dir})")
    p.add_argument("--json", type=Path, default=f.json_path, help=f"results file (default {f.json_path})")


def add_partition_bench(which: Any) -> None:
    """Register ``bench partition``."""
    from p2pnode.bench.partition import PartitionOptions

    o = PartitionOptions()
    p = which.add_parser("partition", allow_abbrev=False,
                         help="a real swarm cut into two halves and healed (network namespaces, root)",
                         description="N `p2pnode run` processes, each in its own network namespace on a "
                                     "private bridge, with --probe-coords: the halves are cut apart "
                                     "(iptables DROP) when the median node finishes --cut-at and healed at "
                                     "--heal-at. "
                                     "Per round: mean pairwise model distance within each half, across and "
                                     "over all pairs, each half's accuracy; rounds after the heal until the "
                                     "distance is back at its pre-partition level. JSON and a PNG plot.")
    for name in ("nodes", "rounds", "cut_at", "heal_at", "local_steps", "fanout", "seed", "probe_coords",
                 "window"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(o, name),
                       help=f"default {getattr(o, name)}")
    p.add_argument("--task", default=o.task, help=f"task (default {o.task})")
    p.add_argument("--reanalyze", action="store_true",
                   help="recompute --json (and --plot) from its run directory's metrics, running nothing")
    p.add_argument("--max-cut-s", type=float, default=None,
                   help="heal after this many seconds of partition if --heal-at has not come yet")
    p.add_argument("--min-cut-s", type=float, default=o.min_cut_s,
                   help="do not heal before the partition has lasted this many seconds, even at --heal-at "
                        f"(default {o.min_cut_s:g}; views shrink only after --record-ttl-s)")
    p.add_argument("--node-flags", default="",
                   help="extra `p2pnode run` flags for every node, one string "
                        "(e.g. --node-flags='--timeout-exchange 4')")
    p.add_argument("--out-dir", type=Path, default=o.out_dir, help=f"swarm outputs (default {o.out_dir})")
    p.add_argument("--json", type=Path, default=o.json_path, help=f"results file (default {o.json_path})")
    p.add_argument("--plot", type=Path, default=o.plot_path, help=f"plot (default {o.plot_path})")


def run_partition_bench_cli(ns: argparse.Namespace) -> int:
    import shlex

    from p2pnode.bench.netns import NetnsError
    from p2pnode.bench.partition import PartitionOptions, format_report, run_partition_bench

    if ns.reanalyze:
        from p2pnode.bench.partition import reanalyze

        print(format_report(reanalyze(ns.json, ns.plot)))
        return 0
    names = ("nodes", "rounds", "cut_at", "heal_at", "local_steps", "fanout", "seed", "probe_coords",
             "window", "task", "max_cut_s", "min_cut_s")
    try:
        opts = PartitionOptions(**{n: getattr(ns, n) for n in names},
                                node_args=tuple(shlex.split(ns.node_flags)), out_dir=ns.out_dir,
                                json_path=ns.json, plot_path=ns.plot)
    except ValueError as exc:
        print(f"p2pnode bench partition: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_partition_bench(opts, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except NetnsError as exc:
        print(f"p2pnode bench partition: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    print(f"results: {ns.json}, plot: {ns.plot}")
    return 0


def run_fuzz_bench_cli(ns: argparse.Namespace) -> int:
    from p2pnode.bench.fuzz import FuzzOptions, format_report, run_fuzz_bench

    try:
        opts = FuzzOptions(messages=ns.messages, lanes=ns.lanes, seed=ns.seed, timeout_s=ns.timeout_s,
                           rate=ns.rate, out_dir=ns.out_dir, json_path=ns.json)
    except ValueError as exc:
        print(f"p2pnode bench fuzz: {exc}", file=sys.stderr)
        return 2
    result = run_fuzz_bench(opts, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_report(result))
    print(f"results: {ns.json}")
    return 0 if result["passed"] else 1


def run_gpu_bench_cli(ns: argparse.Namespace) -> int:
    from p2pnode.bench.gpu import GpuBenchOptions, format_report, run_gpu_bench

    try:
        names = ("device", "nodes", "rounds", "warmup_rounds", "local_steps", "fanout", "trials", "task",
                 "data_dir", "repeats", "numel", "codecs", "schedule", "sections")
        opts = GpuBenchOptions(**{n: getattr(ns, n) for n in names}, json_path=ns.json)
    except ValueError as exc:
        print(f"p2pnode bench gpu: {exc}", file=sys.stderr)
        return 2
    data = run_gpu_bench(opts, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_report(data))
    print(f"results: {ns.json}")
    return 1 if data["errors"] else 0


def add_hotpaths_bench(which: Any) -> None:
    """Register ``bench hotpaths``."""
    from p2pnode.bench.hotpaths import HotpathOptions

    h = HotpathOptions()
    p = which.add_parser("hotpaths", allow_abbrev=False,
                         help="codecs, merge rules, signatures and ping latency against the machine's limits",
                         description="One run: clone() bandwidth of a --d fp32 tensor; each codec's encode "
                                     "and decode throughput as a fraction of it (hivemind's float16 codecs "
                                     "beside); every merge rule on a pre-stacked (n, d) input beside "
                                     "cdist+mean and NNA's floor; Ed25519 seal/open per MB; then the p99 "
                                     "round trip of a signed ping to a `p2pnode run` node training flat out.")
    p.add_argument("--d", type=int, default=h.d, help=f"vector length (default {h.d:,})")
    p.add_argument("--n", type=int, default=h.n, help=f"rows of the merge input (default {h.n})")
    p.add_argument("--repeats", type=int, default=h.repeats,
                   help=f"timed runs per measure (default {h.repeats})")
    p.add_argument("--threads", type=int, default=h.threads, help=f"torch threads (default {h.threads})")
    p.add_argument("--codecs", type=_csv(str), default=h.codecs,
                   help="codecs (default " + ",".join(h.codecs) + ")")
    p.add_argument("--parts", type=_csv(str), default=h.parts,
                   help="what to measure (default " + ",".join(h.parts) + ")")
    p.add_argument("--no-merge-rules", dest="merge_rules", action="store_false",
                   help="skip the merge rules (they need n × d × 4 bytes and more)")
    p.add_argument("--rpc-seconds", type=float, default=h.rpc_seconds,
                   help=f"how long to ping a training node (0 = skip; default {h.rpc_seconds:g})")
    p.add_argument("--rpc-rate", type=float, default=h.rpc_rate,
                   help=f"pings per second (default {h.rpc_rate:g})")
    p.add_argument("--rpc-worker-nice", type=int, default=None,
                   help="the pinged nodes' --worker-nice (default: the nodes' own default)")
    p.add_argument("--rpc-task", default=h.rpc_task,
                   help=f"what the pinged node trains (default {h.rpc_task})")
    p.add_argument("--out-dir", type=Path, default=h.out_dir, help=f"node outputs (default {h.out_dir})")
    p.add_argument("--json", type=Path, default=h.json_path, help=f"results file (default {h.json_path})")


def run_hotpaths_bench_cli(ns: argparse.Namespace) -> int:
    from p2pnode.bench.hotpaths import HotpathOptions, format_report, run_hotpath_bench

    names = ("d", "n", "repeats", "threads", "codecs", "merge_rules", "rpc_seconds", "rpc_rate", "rpc_task",
             "parts", "rpc_worker_nice")
    try:
        opts = HotpathOptions(**{n: getattr(ns, n) for n in names}, out_dir=ns.out_dir, json_path=ns.json)
    except ValueError as exc:
        print(f"p2pnode bench hotpaths: {exc}", file=sys.stderr)
        return 2
    data = run_hotpath_bench(opts, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_report(data))
    print(f"results: {ns.json}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    if ns.bench == "hotpaths":
        return run_hotpaths_bench_cli(ns)
    if ns.bench == "gpu":
        return run_gpu_bench_cli(ns)
    if ns.bench == "fuzz":
        return run_fuzz_bench_cli(ns)
    if ns.bench == "e2e":
        return run_e2e_bench_cli(ns)
    if ns.bench == "partition":
        return run_partition_bench_cli(ns)
    if ns.bench == "robustness":
        from p2pnode.bench.robustness import RobustnessOptions, run_robustness

        opts = RobustnessOptions(honest=ns.honest, byzantine=ns.byzantine, rounds=ns.rounds, fanout=ns.fanout,
                                 local_steps=ns.local_steps, f=ns.f, task=ns.task, partition=ns.partition,
                                 seed=ns.seed, max_grad_norm=ns.max_grad_norm, workers=ns.workers,
                                 attacks=ns.attacks, defenses=ns.defenses,
                                 sybil_counts=ns.sybils, sybil_defenses=ns.sybil_defenses, json_path=ns.json,
                                 plot_path=ns.plot)

        def progress(row: dict[str, Any], done: int, total: int) -> None:
            figures = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
            cell = f"{row['table']} {row['attack']} {row.get('sybils', '')} {row['defense']}"
            print(f"[{done}/{total}] {cell}: {json.dumps(figures)}", file=sys.stderr, flush=True)

        run_robustness(opts, on_cell=progress)
        print(f"results: {ns.json}")
        return 0
    if ns.bench == "variance":
        from p2pnode.bench.variance import VarianceOptions, run_variance_bench

        result = run_variance_bench(VarianceOptions(
            nodes=ns.nodes, rounds=ns.rounds, fanout=ns.fanout, local_steps=ns.local_steps, task=ns.task,
            target=ns.target, seeds=ns.seeds, json_path=ns.json, plot_path=ns.plot))
        print(f"median rounds to {ns.target}: mean {result['median_rounds_mean']}, corrected "
              f"{result['median_rounds_corrected']} (ratio {result['ratio']:.2f}); results: {ns.json}")
        return 0
    if ns.bench == "bristle":
        from p2pnode.bench.bristle import BristleOptions, run_bristle_bench

        res = run_bristle_bench(BristleOptions(nodes=ns.nodes, byzantine=ns.byzantine, rounds=ns.rounds,
                                               fanout=ns.fanout, partition=ns.partition, defenses=ns.defenses,
                                               json_path=ns.json))
        for row in res["rows"]:
            print(json.dumps(row))
        ratios = json.dumps(res["attack_over_no_attack"])
        print(f"accuracy under attack / without: {ratios}; results: {ns.json}")
        return 0
    if ns.bench == "spsa":
        from p2pnode.bench.spsa import SpsaBenchOptions, run_spsa_bench

        names = ("nodes", "rounds", "local_steps", "k", "batch_size", "fanout", "drain_rounds", "join_round",
                 "join_steps", "lr", "eps", "task", "seed", "lockstep")
        runs = tuple(r.strip() for r in ns.runs.split(",") if r.strip())
        result = run_spsa_bench(SpsaBenchOptions(**{n: getattr(ns, n) for n in names}, runs=runs,
                                                 json_path=ns.json, plot_path=ns.plot))
        parts = []
        if "swarm" in result:
            sw = result["swarm"]
            parts.append(f"bytes per delivered scalar {sw['bytes_per_delivered_scalar']:.3f}; swarm final "
                         f"held-out loss {sw['final_loss']:.4f} (start {sw['curve'][0]['loss']:.4f}); "
                         f"max model difference {sw['max_model_diff_end']:.2e}")
        if "single" in result:
            parts.append(f"single node final loss {result['single']['final_loss']:.4f}")
        if "join_run" in result:
            parts.append(f"join run: {json.dumps(result['join_run']['join'])}")
        print("; ".join(parts + [f"results: {ns.json}"]))
        return 0
    if ns.bench == "codecs":
        from p2pnode.bench.codecs import run_codec_bench

        run_codec_bench(specs=ns.codecs, repeats=ns.repeats, threads=ns.threads, json_path=ns.json)
        return 0
    if ns.bench == "churn":
        from p2pnode.bench.churn import ChurnOptions, run_churn_bench

        data = run_churn_bench(ChurnOptions(
            nodes=ns.nodes, killed=ns.killed, joiners=ns.joiners, rounds=ns.rounds, kill_at=ns.kill_at,
            join_at=ns.join_at, seed=ns.seed, task=ns.task, heartbeat_s=ns.heartbeat_s, out_dir=ns.out_dir,
            json_path=ns.json))
        print(json.dumps({k: data[k] for k in ("undisturbed", "churn", "accuracy_drop_points")}, indent=1))
        print(f"results: {ns.json}")
        return 0
    if ns.bench == "mqtt":
        from p2pnode.bench.mqtt import MqttBenchOptions, run_mqtt_bench

        res = run_mqtt_bench(
            MqttBenchOptions(nodes=ns.nodes, rounds=ns.rounds, task=ns.task, local_steps=ns.local_steps,
                             repeats=ns.repeats, skip=ns.skip, telemetry_interval=ns.telemetry_interval,
                             out_dir=ns.out_dir, json_path=ns.json),
            on_run=lambda run: print(json.dumps(run), file=sys.stderr, flush=True))
        med = res["median_round_time_s"]
        print(f"median round time: off {med['off']:.4f} s, broker up {med['up']:.4f} s, "
              f"broker down {med['down']:.4f} s; down/up {res['down_over_up']:.3f}, "
              f"up/off {res['up_over_off']:.3f}; results: {ns.json}")
        return 0
    if ns.bench == "codec-swarm":
        from p2pnode.bench.codec_swarm import CodecSwarmOptions, format_table, run_codec_swarm_bench

        data = run_codec_swarm_bench(
            CodecSwarmOptions(nodes=ns.nodes, rounds=ns.rounds, task=ns.task, fanout=ns.fanout,
                              seed=ns.seed, mode=ns.mode, codecs=ns.codecs, out_dir=ns.out_dir,
                              json_path=ns.json),
            on_row=lambda row: print(json.dumps(row), file=sys.stderr, flush=True))
        print(format_table(data))
        print(f"results: {ns.json}")
        return 0
    from p2pnode.bench.defenses import run_defense_bench

    run_defense_bench(n=ns.n, dims=ns.dims, repeats=ns.repeats, json_path=ns.json, threads=ns.threads)
    print(f"results: {ns.json}")
    return 0
