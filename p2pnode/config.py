"""Typed configuration: one tree that TOML files and CLI flags both map onto.

Each component owns a small dataclass; :class:`NodeConfig` composes them. Every field is
documented in its ``field(metadata={"help": ...})`` — the same text feeds ``--help`` and the
commented TOML that ``p2pnode init`` writes. Validation happens on construction and raises
:class:`~p2pnode.errors.ConfigError` naming the dotted field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from p2pnode.errors import ConfigError
from protocols.codecs import make_codec

_PARTITION_RE = re.compile(r"^(iid|dirichlet:(\d+(\.\d*)?|\.\d+)(e-?\d+)?)$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


def _require(cond: bool, name: str, value: object, allowed: str) -> None:
    if not cond:
        raise ConfigError(name, value, allowed)


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    """What this node learns and from which data."""

    name: str = _doc("task: digits | fashion-mnist | fashion-mnist-transfer | package.module:factory",
                     "digits")
    data_dir: str | None = _doc("directory with the task's data files (default: system package path)", None)
    partition: str = _doc("how the training split is sharded: iid | dirichlet:ALPHA", "iid")
    shard: int = _doc("index of this node's shard (0-based)", 0)
    num_shards: int = _doc("number of shards the training split is cut into", 1)
    batch_size: int = _doc("local SGD mini-batch size", 32)
    lr: float = _doc("local SGD learning rate", 0.05)
    momentum: float = _doc("local SGD momentum", 0.9)
    local_steps: int = _doc("local SGD steps between two gossip exchanges (H)", 20)
    polyak: bool = _doc("Polyak momentum m = βm + (1−β)g (MoNNA) instead of heavy-ball m = βm + g", False)
    lr_tau: float = _doc("learning-rate decay lr / (1 + step/τ) as in MoNNA (0 = constant)", 0.0)
    max_grad_norm: float = _doc("clip each local step's gradient to this L2 norm (0 = off); keeps local SGD "
                                "from diverging on shards of one or two classes (e.g. dirichlet:0.1)", 0.0)
    eval_every: int = _doc("evaluate on the held-out test split every this many rounds", 1)
    eval_samples: int = _doc("test samples used for per-round evaluation (the final one uses all)", 2000)

    def __post_init__(self) -> None:
        _require(bool(self.name), "task.name", self.name, "digits | fashion-mnist | package.module:factory")
        _require(bool(_PARTITION_RE.match(self.partition)), "task.partition", self.partition,
                 "iid | dirichlet:ALPHA with ALPHA > 0")
        if self.partition.startswith("dirichlet:"):
            _require(float(self.partition.split(":", 1)[1]) > 0, "task.partition", self.partition,
                     "dirichlet:ALPHA with ALPHA > 0")
        _require(self.num_shards >= 1, "task.num_shards", self.num_shards, "integer >= 1")
        _require(0 <= self.shard < self.num_shards, "task.shard", self.shard,
                 f"0 <= shard < num_shards ({self.num_shards})")
        _require(self.batch_size >= 1, "task.batch_size", self.batch_size, "integer >= 1")
        _require(self.lr > 0, "task.lr", self.lr, "float > 0")
        _require(0 <= self.momentum < 1, "task.momentum", self.momentum, "0 <= momentum < 1")
        _require(self.local_steps >= 1, "task.local_steps", self.local_steps, "integer >= 1")
        _require(self.lr_tau >= 0, "task.lr_tau", self.lr_tau, "float >= 0 (0 = constant)")
        _require(self.max_grad_norm >= 0, "task.max_grad_norm", self.max_grad_norm, "float >= 0 (0 = off)")
        _require(self.eval_every >= 1, "task.eval_every", self.eval_every, "integer >= 1")
        _require(self.eval_samples >= 1, "task.eval_samples", self.eval_samples, "integer >= 1")

    def sgd_settings(self) -> dict[str, Any]:
        """The local SGD keywords ``LocalTrainer`` and ``ModelStack`` take (one place, so no builder of a
        trainer can drop one: in-process swarms once lost polyak, lr_tau and the gradient clip)."""
        return {"lr": self.lr, "momentum": self.momentum, "polyak": self.polyak, "lr_tau": self.lr_tau,
                "max_grad_norm": self.max_grad_norm}


@dataclass(kw_only=True, slots=True)
class NetworkConfig:
    """Identity, addresses and membership on the DHT."""

    swarm: str = _doc("swarm name: nodes only see members of the same swarm", "default")
    identity: str = _doc("Ed25519 key file (created with mode 0600 if missing)", "~/.p2pnode/identity.key")
    host_maddrs: list[str] = _doc("multiaddrs to listen on (0 = any free port)",
                                  default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] = _doc("multiaddrs other machines should use to reach this node",
                                      default_factory=list)
    initial_peers: list[str] = _doc("multiaddrs of running nodes to join through (empty: start a new swarm)",
                                    default_factory=list)
    heartbeat_s: float = _doc("how often the membership record is re-published", 2.0)
    record_ttl_s: float = _doc("lifetime of a membership record; a silent peer drops out after this", 8.0)
    unreachable_s: float = _doc("how long a peer that failed an exchange is left out of sampling", 10.0)
    max_message_mb: float = _doc("largest message accepted from a peer, in MiB (checked before allocating)",
                                 256.0)
    chunk_kb: int = _doc("stream chunk size in KiB", 1024)
    max_peers: int = _doc("most membership records read per refresh, hence the largest view (peers that "
                          "answered lately first, then a random sample of the rest)", 1024)
    peer_rate: float = _doc("requests per second accepted from one peer (token bucket; 0 = no limit)", 50.0)
    peer_burst: float = _doc("requests one peer may send at once before peer_rate applies", 100.0)
    peer_mb_s: float = _doc("MiB per second accepted from one peer (the bucket holds 2 s of it, at least "
                            "max_message_mb; 0 = no limit)", 1024.0)
    ban_after: float = _doc("penalty points that ban a peer: each rejected message costs 1 (bad signature, "
                            "malformed, replay, oversized, NaN, over its rate)", 10.0)
    score_recovery_s: float = _doc("seconds for a peer to recover one penalty point", 30.0)
    ban_s: float = _doc("how long a banned peer is refused (before its request is read) and left out of "
                        "sampling", 300.0)
    identity_pow_bits: int = _doc("accept only peer ids whose sha256(domain + public key) starts with this "
                                  "many zero bits (0 = off; `p2pnode keygen --pow-bits N` grinds a key)", 0)

    def __post_init__(self) -> None:
        _require(bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.swarm)), "network.swarm", self.swarm,
                 "1-64 characters from A-Z a-z 0-9 _ . -")
        for name in ("host_maddrs", "announce_maddrs", "initial_peers"):
            for maddr in getattr(self, name):
                _require(isinstance(maddr, str) and maddr.startswith("/"), f"network.{name}", maddr,
                         "multiaddrs such as /ip4/127.0.0.1/tcp/31337")
        for maddr in self.initial_peers:
            _require("/p2p/" in maddr, "network.initial_peers", maddr,
                     "full multiaddrs ending in /p2p/<peer id> (as printed by `p2pnode run`)")
        _require(self.heartbeat_s > 0, "network.heartbeat_s", self.heartbeat_s, "float > 0")
        _require(self.record_ttl_s > self.heartbeat_s, "network.record_ttl_s", self.record_ttl_s,
                 f"float > heartbeat_s ({self.heartbeat_s})")
        _require(self.unreachable_s >= 0, "network.unreachable_s", self.unreachable_s, "float >= 0")
        _require(0 < self.max_message_mb <= 4096, "network.max_message_mb", self.max_message_mb,
                 "0 < MiB <= 4096")
        _require(4 <= self.chunk_kb <= 16384, "network.chunk_kb", self.chunk_kb, "4 <= KiB <= 16384")
        self._check_guard()

    def _check_guard(self) -> None:
        _require(self.max_peers >= 1, "network.max_peers", self.max_peers, "integer >= 1")
        for name in ("peer_rate", "peer_mb_s", "ban_s"):
            _require(getattr(self, name) >= 0, f"network.{name}", getattr(self, name), "float >= 0 (0 = off)")
        _require(self.peer_burst >= 1, "network.peer_burst", self.peer_burst, "float >= 1")
        _require(self.ban_after > 0, "network.ban_after", self.ban_after, "float > 0")
        _require(self.score_recovery_s > 0, "network.score_recovery_s", self.score_recovery_s, "float > 0")
        _require(0 <= self.identity_pow_bits <= 32, "network.identity_pow_bits", self.identity_pow_bits,
                 "0 <= bits <= 32")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)


@dataclass(kw_only=True, slots=True)
class GossipConfig:
    """The round loop: how many rounds, with how many peers, merged how."""

    rounds: int = _doc("rounds to run (0 = until stopped)", 0)
    mode: str = _doc("what is gossiped: gossip (models, merged by the defense) | spsa (one-byte SPSA "
                     "scalars) | increments (compressed increments to every peer, FedAvg with error "
                     "feedback; --defense mean only)", "gossip")
    fanout: int = _doc("peers sampled for a push-pull exchange each round (k)", 2)
    defense: str = _doc("merge rule NAME[:ARGS]: mean | nna:F | median | trimmed-mean:F | krum:F | "
                        "multi-krum:F,M | centered-clip:TAU | sybilwall | bristle[:ALPHA[,RHO]]", "mean")
    variance_correction: bool = _doc("rescale each merged layer's spread to the inputs' mean variance "
                                     "(Tian et al.; wraps any defense)", False)
    codec: str = _doc("model exchange codec NAME[:ARGS]: dense | fp16 | bf16 | int8 | topk:RATIO | "
                      "powersgd:RANK | terngrad; every codec but dense sends the difference to a per-peer "
                      "reference", "dense")
    increments_warmup: int = _doc("--mode increments with topk:RATIO: rounds 1..N keep RATIO·2^(N−r+1) "
                                  "(capped at 1), e.g. 4× then 2× with N = 2", 2)
    straggler_factor: float = _doc("a round stops waiting for its sampled peers FACTOR × the median of "
                                   "recent exchange times after it sent (at least straggler_min_s), once one "
                                   "has answered; a later reply is merged next round (0 = wait for every "
                                   "peer up to --timeout-exchange)", 4.0)
    straggler_min_s: float = _doc("the shortest straggler wait, seconds", 1.0)
    sync: bool = _doc("exchange round-aligned models: a push of round r is answered with our model at the "
                      "end of round r's local steps (when we get there, if behind), and only pushes of the "
                      "same round are merged", False)
    overlap: bool = _doc("run the next round's local steps while this round's exchange is in flight (the "
                         "merge is applied as a delta, so they are kept)", False)
    consensus_step: float = _doc("how far a merge moves the model towards the merged result, in (0, 1]; "
                                 "0 = auto: 1 for dense, fp16, bf16 and int8, 0.5 for topk, powersgd and "
                                 "terngrad (a lossy reference lags; CHOCO-SGD's consensus step)", 0.0)
    codec_peers: int = _doc("peers whose codec references are kept (least recently used dropped)", 32)
    max_inbox: int = _doc("most pushed models kept between two merges (latest per peer)", 64)
    wait_peers: int = _doc("wait (up to wait_peers_s) for this many live peers before round 1", 0)
    wait_peers_s: float = _doc("longest wait for wait_peers", 30.0)
    join_donors: int = _doc("joining a running swarm (--mode gossip): start from the coordinate-wise median "
                            "of this many peers' models (one liar among 3 cannot move it; 0 = start from the "
                            "seed's initial model)", 3)
    linger_s: float = _doc("after the last round, keep answering peers this long before exiting", 5.0)

    def __post_init__(self) -> None:
        _require(self.rounds >= 0, "gossip.rounds", self.rounds, "integer >= 0 (0 = forever)")
        _require(self.mode in ("gossip", "spsa", "increments"), "gossip.mode", self.mode,
                 "gossip | spsa | increments")
        _require(self.mode != "increments" or self.defense == "mean", "gossip.defense", self.defense,
                 "mean with --mode increments (it merges by the plain mean; not Byzantine-robust)")
        _require(self.increments_warmup >= 0, "gossip.increments_warmup", self.increments_warmup,
                 "integer >= 0")
        _require(self.fanout >= 0, "gossip.fanout", self.fanout, "integer >= 0")
        _require(self.mode == "gossip" or not self.sync, "gossip.sync", self.sync,
                 "False unless --mode gossip (it aligns exchanged models by round)")
        _require(self.straggler_factor >= 0, "gossip.straggler_factor", self.straggler_factor,
                 "float >= 0 (0 = off)")
        _require(self.straggler_min_s >= 0, "gossip.straggler_min_s", self.straggler_min_s, "seconds >= 0")
        _require(self.max_inbox >= 1, "gossip.max_inbox", self.max_inbox, "integer >= 1")
        _require(0.0 <= self.consensus_step <= 1.0, "gossip.consensus_step", self.consensus_step,
                 "float in (0, 1], or 0 for auto")
        _require(self.codec_peers >= 1, "gossip.codec_peers", self.codec_peers, "integer >= 1")
        try:
            make_codec(self.codec)
        except ValueError as exc:
            raise ConfigError("gossip.codec", self.codec, str(exc)) from None
        _require(self.wait_peers >= 0, "gossip.wait_peers", self.wait_peers, "integer >= 0")
        _require(self.wait_peers_s >= 0, "gossip.wait_peers_s", self.wait_peers_s, "float >= 0")
        _require(self.linger_s >= 0, "gossip.linger_s", self.linger_s, "float >= 0")
        _require(0 <= self.join_donors <= 64, "gossip.join_donors", self.join_donors, "integer in [0, 64]")

    def merge_step(self) -> float:
        """The consensus step in effect: ``consensus_step``, or the codec's default when it is 0.

        With a sparse or low-rank codec the merge inputs are built from per-edge references that lag
        the peers' models by whatever the codec has not sent yet (p2pnode/wire.py), so a full step adds
        that lag as noise; Koloskova et al. (CHOCO-SGD, 2019) take a consensus step below 1 for the same
        reason. Measured on 4-node digits swarms, topk:0.05, 10 rounds: step 1 left the worst node below
        0.80 accuracy in 2 of 8 runs (0.66, 0.76), step 0.5 in none of 8 (worst 0.928).
        """
        if self.consensus_step > 0:
            return self.consensus_step
        return 0.5 if self.codec.partition(":")[0] in LAGGING_CODECS else 1.0


LAGGING_CODECS = frozenset({"topk", "powersgd", "terngrad"})


@dataclass(kw_only=True, slots=True)
class AttackConfig:
    """Test and benchmark only: make this node a Byzantine attacker (honest nodes never set this)."""

    name: str = _doc("attack NAME[:ARGS] (sign-flip, gaussian, alie, ipm, label-flip, targeted-label-flip, "
                     "backdoor, sybil, free-rider); empty = honest", "")
    allies: list[str] = _doc("peer ids of the same attacker's other identities (sybil): an attacker that "
                             "merges leaves their models out", default_factory=list)


@dataclass(kw_only=True, slots=True)
class SpsaConfig:
    """``--mode spsa``: shared-seed SPSA gossip, one byte per scalar (see p2pnode/spsa_node.py)."""

    k: int = _doc("scalars (perturbations) per SPSA step; a round has local_steps steps", 1)
    eps: float = _doc("perturbation size ε of the two-point estimate", 1e-3)
    lr: float = _doc("SPSA learning rate η: θ ← θ − η ĝ z", 1e-4)
    drain_rounds: int = _doc("after the last round, at most this many rounds of exchange with every live "
                             "peer (no producing), until all hold every scalar", 30)
    probe_every: int = _doc("compare the model with peers at 16 fixed coordinates every N rounds "
                            "(0 = never)", 2)
    tolerance: float = _doc("largest probe difference between nodes that applied the same scalars", 1e-4)
    join: bool = _doc("fetch the model and scalar log from running peers before the first round", False)
    max_origins: int = _doc("most origins whose scalars are tracked", 1024)

    def __post_init__(self) -> None:
        _require(1 <= self.k <= 2**16, "spsa.k", self.k, "integer in [1, 65536]")
        for name in ("eps", "lr", "tolerance"):
            value = getattr(self, name)
            _require(value > 0 and value != float("inf"), f"spsa.{name}", value, "float > 0")
        for name in ("drain_rounds", "probe_every"):
            _require(getattr(self, name) >= 0, f"spsa.{name}", getattr(self, name), "integer >= 0")
        _require(self.max_origins >= 1, "spsa.max_origins", self.max_origins, "integer >= 1")


@dataclass(kw_only=True, slots=True)
class Timeouts:
    """Every network deadline, in seconds, in one place."""

    connect: float = _doc("opening a stream to a peer (including dialing it)", 5.0)
    exchange: float = _doc("one whole push-pull exchange, send and receive", 30.0)
    serve_read: float = _doc("reading an incoming request once its stream is open", 30.0)
    dht: float = _doc("one DHT store or get", 10.0)
    shutdown: float = _doc("closing the DHT and transport on exit", 3.0)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _require(isinstance(value, int | float) and value > 0, f"timeouts.{f.name}", value, "seconds > 0")


@dataclass(kw_only=True, slots=True)
class OutputConfig:
    """Where the node reports what it does."""

    metrics_file: str | None = _doc("append one JSON line per round here", None)
    ready_file: str | None = _doc("write {peer_id, maddrs} here once joined", None)
    result_file: str | None = _doc("write the final evaluation here after the last round", None)
    log_level: str = _doc("debug | info | warning | error", "info")

    def __post_init__(self) -> None:
        _require(self.log_level in _LOG_LEVELS, "output.log_level", self.log_level, " | ".join(_LOG_LEVELS))

_MQTT_RE = re.compile(r"^mqtt://[A-Za-z0-9._-]+(:\d{1,5})?/?$")


@dataclass(kw_only=True, slots=True)
class OpsConfig:
    """Operating a node: MQTT telemetry and control, the Prometheus endpoint, checkpoints."""

    mqtt: str | None = _doc("publish telemetry to and take operator commands from this MQTT broker "
                            "(mqtt://HOST[:PORT]); without it, metrics only go to --metrics-file", None)
    telemetry_interval: float = _doc("seconds between two telemetry messages (the latest values)", 2.0)
    metrics_port: int = _doc("serve Prometheus metrics on this TCP port (0 = off)", 0)
    metrics_host: str = _doc("address the Prometheus endpoint listens on", "127.0.0.1")
    operator_keys: list[str] = _doc("peer ids of the operator keys whose signed MQTT commands this node "
                                    "obeys (`p2pnode peer-id --identity operator.key`); empty = obey none",
                                    default_factory=list)
    test_mode: bool = _doc("also obey fault commands (crash, stall): for fault-injection tests only", False)
    checkpoint_dir: str | None = _doc("where the checkpoint command (and a restart) keeps checkpoint.pt; "
                                      "a node started with one resumes from it", None)
    checkpoint_every: int = _doc("with --checkpoint-dir: also checkpoint every N rounds and on SIGTERM "
                                 "(0 = only on the operator's command)", 10)
    probe_coords: int = _doc("add this many fixed model coordinates (the same on every node) to each metrics "
                             "line, to follow model distances between nodes (0 = none)", 0)

    def __post_init__(self) -> None:
        if self.mqtt is not None:
            _require(bool(_MQTT_RE.match(self.mqtt)), "ops.mqtt", self.mqtt, "mqtt://HOST[:PORT]")
            port = self.mqtt_address[1]
            _require(0 < port < 65536, "ops.mqtt", self.mqtt, "a port in 1..65535")
        _require(0 < self.telemetry_interval <= 3600, "ops.telemetry_interval", self.telemetry_interval,
                 "seconds in (0, 3600]")
        _require(self.checkpoint_every >= 0, "ops.checkpoint_every", self.checkpoint_every, "integer >= 0")
        _require(0 <= self.probe_coords <= 4096, "ops.probe_coords", self.probe_coords,
                 "integer in [0, 4096]")
        _require(0 <= self.metrics_port < 65536, "ops.metrics_port", self.metrics_port, "0..65535 (0 = off)")
        _require(bool(self.metrics_host), "ops.metrics_host", self.metrics_host,
                 "an address such as 127.0.0.1")
        for key in self.operator_keys:
            _require(key.startswith("12D3KooW") and 40 <= len(key) <= 64, "ops.operator_keys", key,
                     "Ed25519 peer ids (12D3KooW...) printed by `p2pnode peer-id`")

    @property
    def mqtt_address(self) -> tuple[str, int]:
        """(host, port) of ``mqtt``; port 1883 when it names none."""
        if self.mqtt is None:
            raise ValueError("no MQTT broker configured")
        host, _, port = self.mqtt.removeprefix("mqtt://").rstrip("/").partition(":")
        return host, int(port) if port else 1883


@dataclass(kw_only=True, slots=True)
class NodeConfig:
    """Everything one node needs; built from defaults, then a TOML file, then CLI flags."""

    device: str = _doc("where to train: auto | cpu | cuda | cuda:N", "auto")
    seed: int = _doc("seeds model init, data partition and peer sampling", 0)
    threads: int = _doc("torch CPU threads (0 = torch default)", 0)
    worker_nice: int = _doc("Linux niceness added to the worker threads that train, evaluate and merge, so "
                            "the event loop that answers peers gets the CPU first (0 = off)", 10)
    train_process: bool = _doc("train in a child process with its own interpreter lock, so the exchange's "
                               "Python work does not stall training (launch-bound GPU steps); --mode gossip, "
                               "honest nodes", False)
    task: TaskConfig = field(default_factory=TaskConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    output: OutputConfig = field(default_factory=OutputConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    spsa: SpsaConfig = field(default_factory=SpsaConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)

    def __post_init__(self) -> None:
        _require(bool(_DEVICE_RE.match(self.device)), "device", self.device, "auto | cpu | cuda | cuda:N")
        _require(self.threads >= 0, "threads", self.threads, "integer >= 0")
        _require(0 <= self.worker_nice <= 19, "worker_nice", self.worker_nice, "integer in [0, 19]")
        if self.train_process:
            _require(self.gossip.mode == "gossip" and not self.attack.name, "train_process", True,
                     "false with --mode spsa | increments or an --attack (they reach into the trainer)")


TOP_LEVEL = ("device", "seed", "threads", "worker_nice", "train_process")  # NodeConfig's own scalar fields
SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "network": NetworkConfig,
    "gossip": GossipConfig,
    "timeouts": Timeouts,
    "output": OutputConfig,
    "attack": AttackConfig,
    "spsa": SpsaConfig,
    "ops": OpsConfig,
}


def _coerce(path: str, value: Any, default: Any) -> Any:
    """Check a TOML value's type against the field's default, with int -> float widening."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:  # str or None defaults
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(path, value, f"a value of type {type(default).__name__}")
    return value


def _build(cls: type, prefix: str, values: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{prefix}{key}", value, "one of: " + ", ".join(sorted(known)))
        default = known[key].default
        factory = known[key].default_factory
        if default is dataclasses.MISSING and factory is not dataclasses.MISSING:
            default = factory()
        kwargs[key] = _coerce(f"{prefix}{key}", value, default)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> NodeConfig:
    """Build a validated config from a nested dict (the TOML layout)."""
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(key, value, "a [section] table")
            sections[key] = _build(SECTIONS[key], f"{key}.", value)
        else:
            top[key] = value
    node_defaults = NodeConfig()
    scalar = {k: v for k, v in top.items()}
    for key, value in scalar.items():
        if key not in TOP_LEVEL:
            raise ConfigError(key, value, ", ".join(TOP_LEVEL) + " or a section: " + ", ".join(SECTIONS))
        scalar[key] = _coerce(key, value, getattr(node_defaults, key))
    return NodeConfig(**scalar, **sections)


def config_to_dict(config: NodeConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Defaults, then the TOML file at ``path`` (if any), then dotted ``overrides`` (CLI flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError("--config", str(path),
                              "an existing TOML file (create one: p2pnode init)") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", str(path), f"valid TOML ({exc})") from exc
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.rpartition(".")
        target = data.setdefault(section, {}) if section else data
        target[key] = value
    return config_from_dict(data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def default_toml() -> str:
    """A commented TOML file holding every default (what ``p2pnode init`` writes)."""
    lines = ["# p2pnode configuration. CLI flags override these values.", ""]
    defaults = NodeConfig()
    for f in fields(NodeConfig):
        if f.name in SECTIONS:
            continue
        lines += [f"# {f.metadata['help']}", f"{f.name} = {_toml_value(getattr(defaults, f.name))}"]
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]", f"# {(cls.__doc__ or section).strip().splitlines()[0]}"]
        instance = getattr(defaults, section)
        for f in fields(cls):
            value = getattr(instance, f.name)
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"{f.name} = {_toml_value(value)}" if value is not None else f"# {f.name} = ")
    return "\n".join(lines) + "\n"
