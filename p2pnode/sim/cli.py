"""``p2pnode simulate``: many virtual nodes in one process (see :mod:`p2pnode.sim.core`)."""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

PROG = "p2pnode simulate"

DESCRIPTION = """\
Simulate N virtual p2pnode nodes in this one process. Every virtual node runs the daemon's own round
loop (local SGD, signed push-pull exchanges with k peers, the codec, the defense's merge) over an
in-memory transport on a virtual clock; nothing sleeps and nothing goes over the network.

Rounds are synchronous: in each round every live node trains H local steps, then all exchange and
merge; the next round starts when all are done. Small models (no buffers, e.g. digits' MLP) are kept
as the rows of one tensor and trained in one vmapped batch per round (--batched).

Virtual time: a link between two nodes has latency --latency-ms and bandwidth --bandwidth-mbps, each
scaled per link by a seeded factor in [1 - J, 1 + J] (J = --link-jitter); an exchange of q request
and p reply bytes costs 2 x latency + (q + p) / bandwidth; training costs --step-ms per local step; a
node's round is its training plus its slowest exchange, and a round of the simulation lasts as long
as its slowest live node's. Each node's peer guard (rate limits, bans) runs on virtual time.

Output (--out DIR): summary.json (the contract of `p2pnode swarm`, plus virtual time, peak memory,
topology, churn and timings), metrics.jsonl (every node's round and final events, one sim_round event
per round) and the report of `p2pnode report` (accuracy.png, bytes_sent.png, peers_in_view.png,
index.html; with more than --plot-nodes nodes the plots show an evenly spaced subset).

Exit codes: 0 done; 1 the run failed; 2 bad arguments.

examples:
  p2pnode simulate --nodes 1000 --rounds 50
  p2pnode simulate --nodes 200 --topology geometric:0.12:7 --byzantine-frac 0.1 --attack sign-flip \\
      --defense nna:20 --churn 0.02
  p2pnode simulate --scenario sybilwall --out runs/sybilwall
"""


def _default_out(tag: str = "sim") -> Path:
    return Path("runs") / f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def add_simulate(sub: Any) -> None:
    """Register the ``simulate`` subcommand on the top-level subparsers."""
    p = sub.add_parser("simulate", help="simulate N virtual nodes in one process on a virtual clock",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    g = p.add_argument_group("swarm")
    g.add_argument("--nodes", type=int, default=100, metavar="N",
                   help="number of virtual nodes; node i trains on shard i of N (default 100)")
    g.add_argument("--rounds", type=int, default=20, metavar="R",
                   help="synchronous rounds to run (default 20)")
    g.add_argument("--topology", default="full", metavar="SPEC",
                   help="who may exchange with whom: full (everyone), random-k:K (random K-regular "
                        "graph), ba:M (Barabasi-Albert, M links per new node), geometric:R[:D] (random "
                        "geometric graph in the unit square, radius R, at most D neighbours); seeded by "
                        "--seed (default full)")
    g.add_argument("--byzantine-frac", type=float, default=0.0, metavar="F",
                   help="fraction of nodes (the last ones, round(F*N), at least 1 if F > 0) that run "
                        "--attack (default 0)")
    g.add_argument("--attack", default="", metavar="NAME[:ARGS]",
                   help="attack of the Byzantine nodes, as `p2pnode run --attack` (sign-flip, gaussian, "
                        "alie, ipm, label-flip, sybil, ...; default none)")
    g.add_argument("--churn", default="", metavar="RATE|TRACE",
                   help="RATE in [0, 1]: before every round after the first, each live node leaves and "
                        "each departed node returns with this probability; TRACE: a CSV file of "
                        "round,node,down|up lines applied before that round (default: no churn)")
    g.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seeds shards, initial model, topology, link factors, churn and peer sampling "
                        "(default 0)")
    g = p.add_argument_group("learning (as `p2pnode run`)")
    g.add_argument("--task", default="digits", metavar="NAME",
                   help="task: digits | fashion-mnist | fashion-mnist-transfer | package.module:factory "
                        "(default digits)")
    g.add_argument("--data-dir", default=None, metavar="PATH",
                   help="directory with the task's data files (default: the task's own location)")
    g.add_argument("--partition", default="iid", metavar="iid|dirichlet:ALPHA",
                   help="how the training split is sharded over the nodes (default iid); with more nodes "
                        "than training samples, nodes share shards (node i takes shard i mod samples)")
    g.add_argument("--codec", default="dense", metavar="NAME[:ARGS]",
                   help="model exchange codec, as `p2pnode run --codec` (default dense)")
    g.add_argument("--defense", default="mean", metavar="NAME[:ARGS]",
                   help="merge rule, as `p2pnode run --defense` (default mean)")
    g.add_argument("--variance-correction", action="store_true",
                   help="rescale merged models as Tian et al. (default off)")
    g.add_argument("--fanout", type=int, default=2, metavar="K",
                   help="peers each node pushes to and pulls from per round (default 2)")
    g.add_argument("--local-steps", type=int, default=20, metavar="H",
                   help="local SGD steps per round (default 20)")
    g.add_argument("--batch-size", type=int, default=32, metavar="B",
                   help="local SGD mini-batch size (a smaller shard trains on all of it; default 32)")
    g.add_argument("--lr", type=float, default=0.05, metavar="X",
                   help="local SGD learning rate (default 0.05)")
    g.add_argument("--max-grad-norm", type=float, default=0.0, metavar="X",
                   help="clip each local step's gradient to this L2 norm (default 0: off); keeps local SGD "
                        "finite on shards of one or two classes (e.g. --partition dirichlet:0.1)")
    g.add_argument("--independent-init", action="store_true",
                   help="each node starts from its own random weights (default: one shared initial model)")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="evaluate every live node every N rounds on --eval-samples test samples (0: only the "
                        "final evaluation; default 0)")
    g.add_argument("--eval-samples", type=int, default=2000, metavar="N",
                   help="test samples of the per-round evaluations (default 2000)")
    g.add_argument("--final-eval-samples", type=int, default=10_000, metavar="N",
                   help="test samples of the final evaluation of every node (default 10000, i.e. all of "
                        "fashion-mnist's; digits has 360)")
    g = p.add_argument_group("virtual clock")
    g.add_argument("--latency-ms", type=float, default=20.0, metavar="MS",
                   help="mean one-way latency of a link, milliseconds (default 20)")
    g.add_argument("--bandwidth-mbps", type=float, default=100.0, metavar="MBIT",
                   help="mean bandwidth of a link, megabits per second (default 100)")
    g.add_argument("--link-jitter", type=float, default=0.5, metavar="J",
                   help="each link's latency and bandwidth are scaled by a seeded factor in [1-J, 1+J], "
                        "0 <= J < 1 (default 0.5)")
    g.add_argument("--step-ms", type=float, default=5.0, metavar="MS",
                   help="virtual compute time of one local SGD step, milliseconds (default 5)")
    g = p.add_argument_group("execution")
    g.add_argument("--batched", choices=("auto", "on", "off"), default="auto",
                   help="train and evaluate all nodes' models as rows of one tensor (torch.func.vmap): on, "
                        "off (one model per node), or auto: on for models without buffers unless they are "
                        "convolutional and fewer than 64 (default auto)")
    g.add_argument("--device", default="cpu", metavar="auto|cpu|cuda|cuda:N",
                   help="where the models train (default cpu)")
    g.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (0: torch's default; default 1, the fastest on a busy 2-core "
                        "host)")
    g.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output directory for summary.json, metrics.jsonl and the report "
                        "(default runs/sim-DATE-TIME)")
    g.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the plots and index.html (default: write them)")
    g.add_argument("--plot-nodes", type=int, default=200, metavar="N",
                   help="at most this many nodes' curves in the plots (metrics.jsonl has all; default 200)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr (default: a bar, or a line every 5%% when not a terminal)")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                   help="log level (default warning)")
    g = p.add_argument_group("scenarios")
    g.add_argument("--scenario", default=None, metavar="NAME",
                   help="run a named paper scenario from p2pnode.sim.scenarios instead (monna, sybilwall, "
                        "bristle, vanishing-variance, disaster); it brings its own settings, so only --seed, "
                        "--out, --quick and --workers apply (default: none)")
    g.add_argument("--quick", action="store_true",
                   help="with --scenario: a scaled-down run (digits, few nodes and rounds; default off)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --scenario: processes running its cells (default: the scenario's own choice)")


class ProgressBar:
    """A progress bar on a terminal (one line redrawn), else a plain line every 5% of the rounds."""

    def __init__(self, stream: TextIO, *, nodes: int) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.nodes = nodes
        self._last_pct = -1

    def __call__(self, done: int, total: int, info: dict[str, Any]) -> None:
        pct = int(100 * done / total)
        if not self.tty and pct // 5 == self._last_pct // 5 and done != total:
            return
        self._last_pct = pct
        wall = float(info.get("wall_s", 0.0))
        eta = wall / done * (total - done) if done else 0.0
        acc = info.get("honest_accuracy_mean")
        width = 24
        filled = int(width * done / total)
        bar = "#" * filled + "-" * (width - filled)
        text = (f"[{bar}] round {done}/{total} | live {info.get('live', '?')}/{self.nodes}"
                + (f" | honest acc {acc:.3f}" if isinstance(acc, float) else "")
                + f" | loss {info.get('train_loss_mean') or math.nan:.3f}"
                + f" | virtual {info.get('virtual_time_s', 0.0):.1f} s | wall {wall:.0f} s | eta {eta:.0f} s")
        if self.tty:
            self.stream.write("\r" + text + ("\n" if done == total else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _options(ns: argparse.Namespace) -> Any:
    from p2pnode.sim.core import SimOptions

    return SimOptions(nodes=ns.nodes, rounds=ns.rounds, topology=ns.topology,
                      byzantine_frac=ns.byzantine_frac if ns.byzantine_frac else None, attack=ns.attack,
                      churn=ns.churn, seed=ns.seed, task=ns.task, data_dir=ns.data_dir,
                      partition=ns.partition,
                      codec=ns.codec, defense=ns.defense, variance_correction=ns.variance_correction,
                      fanout=ns.fanout, local_steps=ns.local_steps, batch_size=ns.batch_size, lr=ns.lr,
                      max_grad_norm=ns.max_grad_norm,
                      independent_init=ns.independent_init, eval_every=ns.eval_every,
                      eval_samples=ns.eval_samples, final_eval_samples=ns.final_eval_samples,
                      latency_ms=ns.latency_ms, bandwidth_mbps=ns.bandwidth_mbps, link_jitter=ns.link_jitter,
                      step_ms=ns.step_ms, batched=ns.batched, device=ns.device,
                      out=ns.out if ns.out is not None else _default_out(), plot_nodes=ns.plot_nodes)


def _check_flags(ns: argparse.Namespace) -> str | None:
    for name, low in (("nodes", 2), ("rounds", 1), ("fanout", 0), ("local_steps", 1), ("batch_size", 1),
                      ("eval_every", 0), ("eval_samples", 1), ("final_eval_samples", 1), ("threads", 0),
                      ("plot_nodes", 1)):
        if getattr(ns, name) < low:
            return f"--{name.replace('_', '-')} must be >= {low}, got {getattr(ns, name)}"
    if ns.byzantine_frac and not ns.attack:
        return "--byzantine-frac needs --attack NAME"
    return None


def _print_summary(summary: dict[str, Any], out: Path | None) -> None:
    rss = summary.get("peak_rss_mib")
    honest = sum(1 for n in summary["nodes"] if n["role"] != "byzantine")
    print(f"honest accuracy: mean {summary['honest_accuracy_mean']:.4f}, "
          f"min {summary['honest_accuracy_min']:.4f} ({honest} honest nodes)")
    print(f"wall time {summary['wall_time_s']:.1f} s, peak memory {rss:.0f} MiB, virtual time "
          f"{summary['virtual_time_s']:.2f} s ({summary['virtual_round_s']['mean']:.3f} s per round), "
          f"training {summary['training']}")
    if out is not None:
        print(f"wrote {out / 'summary.json'}" + (f" and {out / 'index.html'}" if (out / "index.html").exists()
                                                  else ""))


def _run_scenario(ns: argparse.Namespace) -> int:
    try:
        from p2pnode.sim import scenarios
    except ModuleNotFoundError as exc:
        if exc.name != "p2pnode.sim.scenarios":
            raise
        print(f"{PROG}: error: --scenario needs p2pnode.sim.scenarios, which is not installed here",
              file=sys.stderr)
        return 2
    table = getattr(scenarios, "SCENARIOS", {})
    if ns.scenario not in table:
        print(f"{PROG}: error: unknown scenario {ns.scenario!r}; known: {', '.join(table) or 'none'}",
              file=sys.stderr)
        return 2
    entry = table[ns.scenario]
    runner = getattr(entry, "run", entry)
    out = ns.out if ns.out is not None else _default_out(f"sim-{ns.scenario}")
    kwargs: dict[str, Any] = {"seed": ns.seed, "quick": ns.quick,
                              "progress": lambda msg: print(msg, file=sys.stderr, flush=True)}
    if ns.workers is not None:
        kwargs["workers"] = ns.workers
    accepted = inspect.signature(runner).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    result = runner(out, **kwargs)
    for row in result.get("rows", []) if isinstance(result, dict) else []:
        print(f"{row.get('row', '')}: ours {row.get('ours', '')}; paper {row.get('paper', '')}")
    print(f"wrote {out}")
    return 0


def cmd_simulate(ns: argparse.Namespace) -> int:
    """Run ``p2pnode simulate``; returns the exit code."""
    from p2pnode.cli import configure_logging

    configure_logging(ns.log_level)
    if ns.scenario:
        return _run_scenario(ns)
    problem = _check_flags(ns)
    if problem is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    import torch

    from p2pnode.sim.core import run_simulation

    opts = _options(ns)
    previous = torch.get_num_threads()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    try:
        progress = ProgressBar(sys.stderr, nodes=opts.nodes) if ns.progress else None
        print(f"simulating {opts.nodes} nodes, {opts.rounds} rounds, {opts.task}, topology {opts.topology}"
              f" (output {opts.out})", file=sys.stderr, flush=True)
        summary = run_simulation(opts, progress=progress, report=ns.report)
    finally:
        torch.set_num_threads(previous)
    _print_summary(summary, Path(opts.out))
    return 0

