"""Local swarm supervisor behind ``p2pnode swarm``.

Starts N ``p2pnode run`` child processes on loopback (node 0 first, as the bootstrap peer), follows
their metrics files, waits until each live node has written its result file, and writes
``OUT/summary.json``, ``OUT/metrics.jsonl`` and the report (plots and ``OUT/index.html``, see
:mod:`p2pnode.run_report`). Only processes started here are ever signalled, always by their pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pnode.errors import ConfigError, P2PNodeError
from p2pnode.identity import load_or_create_identity
from p2pnode.report import MetricsTail
from p2pnode.run_report import write_report

if TYPE_CHECKING:
    from rich.console import Console

logger = logging.getLogger(__name__)

DEFAULT_NODE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "p2pnode", "run")
_PARTITION_RE = re.compile(r"^(iid|dirichlet:(\d+(\.\d*)?|\.\d+)(e-?\d+)?)$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SWARM_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_POLL_S = 0.5


class SwarmStartError(P2PNodeError):
    """A node exited or timed out before writing its ready file; carries the tail of its log."""


def _default_out() -> Path:
    return Path("runs") / f"swarm-{time.strftime('%Y%m%d-%H%M%S')}"


def swarm_name_for(out: Path) -> str:
    """Derive a swarm name unique to an output directory (so concurrent swarms never mix)."""
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", out.name).strip("-.") or "swarm"
    return f"{stem[:40]}-{digest}"


def _require(cond: bool, name: str, value: object, allowed: str) -> None:
    if not cond:
        raise ConfigError(name, value, allowed)


def _doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass(kw_only=True, slots=True)
class SwarmOptions:
    """Everything ``p2pnode swarm`` needs to run a local swarm.

    Each field is documented in its ``metadata["help"]`` (usable for ``--help`` text); validation
    happens on construction and raises :class:`~p2pnode.errors.ConfigError` (``field="swarm.<name>"``).
    """

    nodes: int = _doc("number of node processes; node i trains on shard i/nodes", 4)
    rounds: int = _doc("gossip rounds each node runs", 20)
    task: str = _doc("task passed to every node: digits | fashion-mnist | package.module:factory",
                     "fashion-mnist")
    partition: str = _doc("how the training split is sharded: iid | dirichlet:ALPHA", "iid")
    seed: int = _doc("base random seed passed to every node", 0)
    fanout: int = _doc("peers sampled for a push-pull exchange each round (k)", 2)
    local_steps: int = _doc("local SGD steps between two exchanges (H)", 20)
    defense: str = _doc("merge rule of every node, NAME[:ARGS] (see `p2pnode run --help`)", "mean")
    codec: str = _doc("model exchange codec of every node, NAME[:ARGS] (see `p2pnode run --help`)", "dense")
    byzantine: int = _doc("how many nodes (the last ones) run --attack; test and benchmark only", 0)
    attack: str = _doc("attack NAME[:ARGS] of the Byzantine nodes (see `p2pnode run --help`)", "")
    sybils: int = _doc("with --attack sybil: one attacker running this many identities (node processes "
                       "with their own keys, all on the attacker's one shard); replaces --byzantine", 0)
    device: str = _doc("where nodes train: auto | cpu | cuda | cuda:N", "cpu")
    out: Path = _doc("output directory (keys/ logs/ nodes/ summary.json metrics.jsonl index.html *.png)",
                     default_factory=_default_out)
    swarm: str | None = _doc("swarm name on the DHT (default: derived from the output directory)", None)
    start_timeout_s: float = _doc("longest wait for a node's ready file after launching it", 120.0)
    round_timeout_s: float | None = _doc("deadline for the whole run after start-up, in seconds "
                                         "(default: 60 + 30 * rounds)", None)
    linger_s: float = _doc("how long a finished node keeps serving slower peers (the supervisor stops all "
                           "nodes once every node has finished)", 30.0)
    log_level: str = _doc("log level of the nodes: debug | info | warning | error", "warning")
    extra_args: list[str] = _doc("extra arguments appended verbatim to every node's command line",
                                 default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.swarm is None:
            self.swarm = swarm_name_for(self.out)
        if self.round_timeout_s is None and isinstance(self.rounds, int):
            self.round_timeout_s = 60.0 + 30.0 * self.rounds
        for name, low in (("nodes", 1), ("rounds", 1), ("seed", 0), ("fanout", 0), ("local_steps", 1),
                          ("byzantine", 0), ("sybils", 0)):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= low, f"swarm.{name}",
                     value, f"integer >= {low}")
        _require(isinstance(self.task, str) and bool(self.task), "swarm.task", self.task,
                 "digits | fashion-mnist | package.module:factory")
        part = self.partition
        _require(isinstance(part, str) and bool(_PARTITION_RE.match(part))
                 and (part == "iid" or float(part.split(":", 1)[1]) > 0),
                 "swarm.partition", part, "iid | dirichlet:ALPHA with ALPHA > 0")
        _require(isinstance(self.device, str) and bool(_DEVICE_RE.match(self.device)), "swarm.device",
                 self.device, "auto | cpu | cuda | cuda:N")
        _require(isinstance(self.swarm, str) and bool(_SWARM_RE.match(self.swarm)), "swarm.swarm", self.swarm,
                 "1-64 characters from A-Z a-z 0-9 _ . -")
        for name, zero_ok in (("start_timeout_s", False), ("round_timeout_s", False), ("linger_s", True)):
            secs = getattr(self, name)
            ok = isinstance(secs, int | float) and (secs >= 0 if zero_ok else secs > 0)
            _require(ok, f"swarm.{name}", secs, "seconds >= 0" if zero_ok else "seconds > 0")
        if self.sybils:
            ok = self.attack.startswith("sybil") and self.byzantine in (0, self.sybils)
            _require(ok, "swarm.sybils", self.sybils,
                     "a count > 0 together with --attack sybil[:ARGS] (and no other --byzantine)")
            self.byzantine = self.sybils
        _require(self.byzantine < self.nodes, "swarm.byzantine", self.byzantine,
                 f"0 <= byzantine < nodes ({self.nodes})")
        _require(self.byzantine == 0 or bool(self.attack), "swarm.attack", self.attack,
                 "an attack NAME[:ARGS] when --byzantine > 0")
        _require(isinstance(self.defense, str) and bool(self.defense), "swarm.defense", self.defense,
                 "a defense NAME[:ARGS]")
        _require(self.log_level in _LOG_LEVELS, "swarm.log_level", self.log_level, " | ".join(_LOG_LEVELS))
        _require(isinstance(self.extra_args, list) and all(isinstance(a, str) for a in self.extra_args),
                 "swarm.extra_args", self.extra_args, "a list of strings")

    def to_json(self) -> dict[str, Any]:
        """All options as a JSON-serializable dict (``out`` as a string)."""
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass(frozen=True, slots=True)
class NodePaths:
    """Files belonging to node ``i`` of a swarm."""

    key: Path
    log: Path
    metrics: Path
    ready: Path
    result: Path


@dataclass(slots=True)
class NodeProgress:
    """What is known about one node from its metrics, ready and result files and its process."""

    node: int
    peer_id: str = ""
    role: str = "honest"
    round: int = 0
    train_loss: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_rejected: int = 0
    peers_in_view: int = 0
    finished: bool = False
    result: dict[str, Any] | None = None
    exited: bool = False
    exit_code: int | None = None

    @property
    def failed(self) -> bool:
        """The process exited without writing a result."""
        return self.exited and not self.finished


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Swarm:
    """Supervisor of a local swarm of node processes.

    Parameters
    ----------
    opts
        What to run.
    node_command
        Command prefix that starts one node (default ``[sys.executable, "-m", "p2pnode", "run"]``);
        the node flags of the process contract are appended to it.
    env
        Extra environment variables for the nodes (on top of ``os.environ`` and the thread settings).

    Use it as a context manager, or call :meth:`stop` in a ``finally``.
    """

    def __init__(self, opts: SwarmOptions, *, node_command: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.opts = opts
        self.out = opts.out.resolve()
        self.node_command = list(node_command) if node_command is not None else list(DEFAULT_NODE_COMMAND)
        self.processes: list[subprocess.Popen[bytes]] = []
        self._env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                     "PYTHONUNBUFFERED": "1"}
        self._tails = [MetricsTail(self.node_paths(i).metrics) for i in range(opts.nodes)]
        self._progress = [NodeProgress(node=i) for i in range(opts.nodes)]
        self._bootstrap_maddr: str | None = None
        self._allies: list[str] = []  # peer ids of the Sybil identities (see _make_sybil_keys)
        self._t_start: float | None = None
        self._t_end: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def node_paths(self, i: int) -> NodePaths:
        """Paths of node ``i``'s key, log, metrics, ready and result files."""
        nodes = self.out / "nodes"
        return NodePaths(key=self.out / "keys" / f"node-{i}.key", log=self.out / "logs" / f"node-{i}.log",
                         metrics=nodes / f"node-{i}.metrics.jsonl", ready=nodes / f"node-{i}.ready.json",
                         result=nodes / f"node-{i}.result.json")

    def _command(self, i: int) -> list[str]:
        o, p = self.opts, self.node_paths(i)
        honest = o.nodes - o.byzantine
        # Sybil identities are one attacker: they all train on the attacker's single shard
        shard = f"{min(i, honest)}/{honest + 1}" if o.sybils else f"{i}/{o.nodes}"
        cmd = [*self.node_command, "--task", o.task, "--rounds", str(o.rounds), "--shard", shard,
               "--partition", o.partition, "--seed", str(o.seed), "--identity", str(p.key),
               "--swarm", str(o.swarm), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
        if i > 0:
            assert self._bootstrap_maddr is not None
            cmd += ["--initial-peers", self._bootstrap_maddr]
        cmd += ["--metrics-file", str(p.metrics), "--ready-file", str(p.ready),
                "--result-file", str(p.result), "--linger-s", str(o.linger_s),
                "--fanout", str(o.fanout), "--local-steps", str(o.local_steps), "--device", o.device,
                "--threads", "1", "--log-level", o.log_level, "--defense", o.defense,
                "--codec", o.codec,
                # every node waits (bounded) until the others are in its view, so none races ahead alone
                "--wait-peers", str(o.nodes - 1), *o.extra_args]
        if i >= o.nodes - o.byzantine:
            cmd += ["--attack", o.attack]
            if self._allies:
                cmd += ["--allies", *self._allies]
        return cmd

    def _make_sybil_keys(self) -> None:
        """Sybil identities are one attacker that knows all its keys: create them up front so every
        identity can be told the others' peer ids (``--allies``)."""
        if not self.opts.sybils:
            return
        first = self.opts.nodes - self.opts.byzantine
        for i in range(first, self.opts.nodes):
            self._allies.append(load_or_create_identity(self.node_paths(i).key).peer_id)

    def _launch(self, i: int, extra_args: Sequence[str] = ()) -> None:
        cmd = [*self._command(i), *extra_args]
        logger.debug("starting node %d: %s", i, cmd)
        with open(self.node_paths(i).log, "wb") as log:
            # A new session keeps the terminal's Ctrl-C away from the nodes: the supervisor stops them.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=self._env, start_new_session=True)
        self.processes.append(proc)

    def _wait_ready(self, indices: list[int]) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + self.opts.start_timeout_s
        ready: dict[int, dict[str, Any]] = {}
        while True:
            for i in indices:
                if i in ready:
                    continue
                info = _read_json(self.node_paths(i).ready)
                if info is not None and isinstance(info.get("maddrs"), list) and info["maddrs"]:
                    ready[i] = info
                    self._progress[i].peer_id = str(info.get("peer_id", ""))
                    continue
                code = self.processes[i].poll()
                if code is not None:
                    raise SwarmStartError(f"node {i} exited with code {code} before it was ready; "
                                          f"last lines of {self.node_paths(i).log}:\n"
                                          f"{_log_tail(self.node_paths(i).log)}")
            if len(ready) == len(indices):
                return ready
            if time.monotonic() > deadline:
                i = next(j for j in indices if j not in ready)
                raise SwarmStartError(f"node {i} not ready after {self.opts.start_timeout_s:g} s; "
                                      f"last lines of {self.node_paths(i).log}:\n"
                                      f"{_log_tail(self.node_paths(i).log)}")
            time.sleep(0.05)

    def start(self, count: int | None = None) -> None:
        """Create the output tree, start the bootstrap node, then all others; wait until all are ready.

        ``count`` starts only nodes ``0 .. count-1``; the others are started later with :meth:`launch_late`
        (churn experiments).

        Raises
        ------
        SwarmStartError
            A node exited or did not become ready within ``start_timeout_s``; every node started so
            far has been stopped.
        """
        if self.processes:
            raise RuntimeError("swarm already started")
        for sub in ("keys", "logs", "nodes"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self._t_start = time.time()
        self._make_sybil_keys()
        try:
            self._launch(0)
            info = self._wait_ready([0])[0]
            maddrs = [str(m) for m in info["maddrs"]]
            self._bootstrap_maddr = next((m for m in maddrs if m.startswith("/ip4/127.0.0.1/")), maddrs[0])
            logger.info("bootstrap node ready at %s", self._bootstrap_maddr)
            first = self.opts.nodes if count is None else count
            for i in range(1, first):
                self._launch(i)
            self._wait_ready(list(range(1, first)))
        except BaseException:
            self.stop()
            raise
        logger.info("%d nodes ready (swarm %s)", len(self.processes), self.opts.swarm)

    def launch_late(self, i: int, extra_args: Sequence[str] = ()) -> dict[str, Any]:
        """Start node ``i`` (the next one not started yet) into the running swarm; wait until it is ready.

        ``extra_args`` are appended to its command line (a later flag overrides an earlier one, e.g. a
        smaller ``--rounds`` for a node that joins halfway).
        """
        if i != len(self.processes) or i >= self.opts.nodes or self._bootstrap_maddr is None:
            raise ValueError(f"node {i} cannot be started now ({len(self.processes)} of {self.opts.nodes} "
                             "started; start() first, then the next index)")
        self._launch(i, extra_args)
        return self._wait_ready([i])[i]

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every node still running, wait up to ``grace_s``, then SIGKILL. Idempotent."""
        alive = [p for p in self.processes if p.poll() is None]
        try:
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
            deadline = time.monotonic() + grace_s
            for p in alive:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for p in self.processes:
                if p.poll() is None:
                    logger.warning("node pid %d ignored SIGTERM; killing it", p.pid)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    p.wait()

    # -- progress ----------------------------------------------------------------------------------
    @staticmethod
    def _apply_event(prog: NodeProgress, ev: dict[str, Any]) -> None:
        prog.peer_id = str(ev.get("peer_id") or prog.peer_id)
        prog.role = str(ev.get("role") or prog.role)
        for key in ("bytes_sent", "bytes_received", "messages_rejected"):
            if isinstance(ev.get(key), int):
                setattr(prog, key, ev[key])
        if ev["event"] == "round":
            prog.round = int(ev.get("round") or prog.round)
            prog.train_loss = float(ev["train_loss"]) if ev.get("train_loss") is not None else None
            prog.peers_in_view = int(ev.get("peers_in_view") or 0)
        if ev.get("test_accuracy") is not None:
            prog.test_accuracy = float(ev["test_accuracy"])
        if ev.get("test_loss") is not None:
            prog.test_loss = float(ev["test_loss"])

    def poll_progress(self) -> list[NodeProgress]:
        """Read new metrics lines and result files, check the processes, and return one entry per node."""
        for i, prog in enumerate(self._progress):
            code = self.processes[i].poll() if i < len(self.processes) else None
            for ev in self._tails[i].read_new(writer_exited=code is not None):
                try:
                    self._apply_event(prog, ev)
                except (TypeError, ValueError):
                    logger.debug("node %d: ignoring malformed metrics event %r", i, ev)
            if not prog.finished:
                result = _read_json(self.node_paths(i).result)
                if result is not None:
                    prog.finished, prog.result = True, result
                    if isinstance(result.get("rounds"), int):
                        prog.round = result["rounds"]
            if code is not None and not prog.exited:
                prog.exited, prog.exit_code = True, code
                if not prog.finished:
                    logger.warning("node %d exited with code %s before finishing", i, code)
        return [dataclasses.replace(p) for p in self._progress]

    def wait_finished(self, timeout: float | None = None, *,
                      on_progress: Callable[[list[NodeProgress]], None] | None = None) -> bool:
        """Wait until every node has either written its result file or died.

        Parameters
        ----------
        timeout
            Seconds to wait (default ``opts.round_timeout_s``).
        on_progress
            Called with the fresh progress list about twice per second.

        Returns
        -------
        bool
            True if every node finished; False if one died without a result or the timeout passed.
        """
        timeout = self.opts.round_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + float(timeout or 0)
        while True:
            progress = self.poll_progress()
            if on_progress is not None:
                on_progress(progress)
            if all(p.finished or p.exited for p in progress):
                break
            if time.monotonic() > deadline:
                logger.warning("swarm did not finish within %.0f s", timeout)
                break
            time.sleep(_POLL_S)
        self._t_end = time.time()
        return all(p.finished for p in progress)

    # -- results -----------------------------------------------------------------------------------
    def _node_entry(self, p: NodeProgress) -> dict[str, Any]:
        r = p.result or {}

        def pick(key: str, fallback: Any) -> Any:
            return r[key] if r.get(key) is not None else fallback

        acc = pick("test_accuracy", p.test_accuracy if p.test_accuracy is not None else 0.0)
        loss = pick("test_loss", p.test_loss if p.test_loss is not None else math.nan)
        return {"node": p.node, "peer_id": str(pick("peer_id", p.peer_id)), "role": str(pick("role", p.role)),
                "rounds": int(pick("rounds", p.round)), "test_accuracy": float(acc), "test_loss": float(loss),
                "bytes_sent": int(pick("bytes_sent", p.bytes_sent)),
                "bytes_received": int(pick("bytes_received", p.bytes_received)),
                "messages_rejected": int(pick("messages_rejected", p.messages_rejected)),
                "finished": p.finished, "exit_code": p.exit_code}

    def events(self) -> list[dict[str, Any]]:
        """All round/final events read so far, each with ``"node": i``, in time order."""
        rows = [{**ev, "node": i} for i, tail in enumerate(self._tails) for ev in tail.events]
        rows.sort(key=lambda ev: (ev["t"] if isinstance(ev.get("t"), int | float) else 0.0, ev["node"]))
        return rows

    def summarize(self) -> dict[str, Any]:
        """Write ``summary.json``, ``metrics.jsonl`` and the report (``accuracy.png``, ``bytes_sent.png``,
        ``peers_in_view.png``, ``index.html``; see :func:`~p2pnode.run_report.write_report`) to the
        output directory.

        Nodes that died without a result are reported with their last metrics (``finished: false``,
        accuracy of their last evaluation or 0.0) and still count in ``honest_accuracy_min``.
        """
        nodes = [self._node_entry(p) for p in self.poll_progress()]
        honest = [n["test_accuracy"] for n in nodes if n["role"] != "byzantine"]
        start = self._t_start if self._t_start is not None else time.time()
        end = self._t_end if self._t_end is not None else time.time()
        summary: dict[str, Any] = {
            "config": self.opts.to_json(), "wall_time_s": round(end - start, 3), "nodes": nodes,
            "honest_accuracy_mean": sum(honest) / len(honest) if honest else 0.0,
            "honest_accuracy_min": min(honest) if honest else 0.0,
            "all_finished": all(n["finished"] for n in nodes), "out": str(self.out),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.out / "summary.json")
        rows = self.events()
        with open(self.out / "metrics.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        write_report(rows, summary, self.out)
        return summary


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt in the main thread, so ``with Swarm`` blocks stop
    the node processes they started (benches and ``p2pnode swarm`` run under it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_swarm(opts: SwarmOptions, *, console: Console | None = None, live: bool = True,
              node_command: list[str] | None = None) -> dict[str, Any]:
    """Start a local swarm, show its progress, wait for it, summarize it and stop it.

    Parameters
    ----------
    opts
        What to run.
    console
        Where progress and the final table go (default: a new console on stderr).
    live
        Show live progress bars (one per node plus an overall one, refreshed about twice a second).
    node_command
        Override of the node command prefix (tests); see :class:`Swarm`.

    Returns
    -------
    dict
        The summary, also written to ``OUT/summary.json`` (see :meth:`Swarm.summarize`).

    Raises
    ------
    SwarmStartError
        A node failed to start (all nodes are stopped).
    KeyboardInterrupt
        On Ctrl-C or SIGTERM: all nodes are stopped and a partial summary is written first.
    """
    from rich.console import Console

    from p2pnode.report import SwarmProgressView, print_summary

    console = console if console is not None else Console(stderr=True)
    swarm = Swarm(opts, node_command=node_command)
    with sigterm_as_interrupt():
        try:
            console.print(f"starting {opts.nodes} nodes (swarm {opts.swarm}, output {swarm.out})")
            swarm.start()
            if live:
                with SwarmProgressView(console, nodes=opts.nodes, rounds=opts.rounds) as view:
                    swarm.wait_finished(on_progress=view.update)
            else:
                swarm.wait_finished()
            swarm.stop()
            summary = swarm.summarize()
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping all nodes[/yellow]")
            swarm.stop()
            if swarm.processes:
                with contextlib.suppress(Exception):
                    swarm.summarize()
            raise
        finally:
            swarm.stop()
    print_summary(console, summary)
    return summary
