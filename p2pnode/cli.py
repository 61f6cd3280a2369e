"""Command line of the daemon: ``p2pnode run | swarm | simulate | init | keygen | peer-id | report | monitor
| control | bench``.

The flags of ``run`` are generated from the :class:`~p2pnode.config.NodeConfig` tree and those of
``swarm`` from :class:`~p2pnode.swarm.SwarmOptions`, so TOML keys, flags and ``--help`` text come
from one place (each field's ``metadata["help"]``). Every flag defaults to ``argparse.SUPPRESS``:
only the flags a user actually gives become overrides on top of the defaults and ``--config``.

Flag names: the field name with ``_`` -> ``-`` (``gossip.fanout`` -> ``--fanout``), except
``task.name`` -> ``--task``, ``--shard I/N`` (sets ``task.shard`` and ``task.num_shards``) and the
``timeouts`` section, whose generic names get a ``--timeout-`` prefix (``--timeout-connect``). A
field name used by two sections would get its section as prefix. Values are typed after parsing,
so a bad value is a :class:`~p2pnode.errors.ConfigError` naming the dotted field: one line, exit 2.

This is the only layer that prints to the terminal or configures logging.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from p2pnode import __version__
from p2pnode.config import SECTIONS, NetworkConfig, NodeConfig, default_toml, load_config
from p2pnode.errors import ConfigError, IdentityError, P2PNodeError
from p2pnode.identity import Identity, grind_identity, load_identity, save_identity
from p2pnode.swarm import SwarmOptions, SwarmStartError, run_swarm

logger = logging.getLogger(__name__)

PROG = "p2pnode"
DEFAULT_CONFIG_FILE = "p2pnode.toml"
_LOG_HANDLER_NAME = "p2pnode-cli"
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
               "error": logging.ERROR}
_RENAMED = {"task.name": "task", "task.shard": "shard", "attack.name": "attack"}
_SECTION_PREFIX = {"timeouts": "timeout-", "spsa": "spsa-"}
_SWARM_SKIPPED = ("extra_args",)  # filled from the arguments after `--`

DESCRIPTION = """\
p2pnode is a peer-to-peer gossip-learning daemon. Every machine runs one node: it joins a swarm
through a DHT, trains its model on its own data shard, and each round exchanges models with a few
random live peers and merges them. There is no server: any running node can let others in.

several machines (run `p2pnode keygen` once on each):
  first:   p2pnode run --host-maddrs /ip4/0.0.0.0/tcp/31337 --announce-maddrs /ip4/PUBLIC_IP/tcp/31337
           (prints its multiaddr, /ip4/PUBLIC_IP/tcp/31337/p2p/12D3KooW...)
  others:  p2pnode run --initial-peers /ip4/PUBLIC_IP/tcp/31337/p2p/12D3KooW...
one machine, a local demo swarm of 4 processes:
  p2pnode swarm
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


@dataclass(frozen=True, slots=True)
class FlagField:
    """One config field as a flag: where it goes, its value kind and its help text."""

    path: str  # dotted config path ("gossip.fanout"); for swarm options "swarm.<name>"
    kind: type  # bool, int, float, str, Path or list (of str)
    help: str
    default: Any

    @property
    def key(self) -> str:
        return self.path.rpartition(".")[2]


def _kind(hint: Any) -> type:
    """Reduce a field's type hint to the kind of value a flag parses into."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint)
    kind = origin if origin is not None else hint
    if kind not in (bool, int, float, str, Path, list):
        raise TypeError(f"no flag type for {hint!r}")
    return kind


def _default_of(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING and f.name != "out":  # out: a fresh timestamped folder each run
        return f.default_factory()
    return None


def _fields_of(cls: type, prefix: str) -> list[FlagField]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.name in SECTIONS and prefix == "":
            continue
        out.append(FlagField(f"{prefix}{f.name}", _kind(hints[f.name]), f.metadata["help"], _default_of(f)))
    return out


def node_fields() -> list[FlagField]:
    """Every leaf field of :class:`NodeConfig`, top-level ones first."""
    result = _fields_of(NodeConfig, "")
    for section, cls in SECTIONS.items():
        result += _fields_of(cls, f"{section}.")
    return result


def flag_names(flds: list[FlagField]) -> dict[str, str]:
    """Map each dotted path to its flag (without dashes); see the module docstring for the rule."""
    # sections with their own prefix never clash with the others, so they take no part in the count
    counts = Counter(f.key for f in flds if f.path.rpartition(".")[0] not in _SECTION_PREFIX)
    names = {}
    for f in flds:
        section = f.path.rpartition(".")[0]
        if f.path in _RENAMED:
            name = _RENAMED[f.path]
        elif section in _SECTION_PREFIX:
            name = _SECTION_PREFIX[section] + f.key
        elif counts[f.key] > 1:
            name = f"{section}-{f.key}"
        else:
            name = f.key
        names[f.path] = name.replace("_", "-")
    clashes = [n for n, c in Counter(names.values()).items() if c > 1]
    if clashes:
        raise RuntimeError(f"config fields map onto the same flag: {clashes}")
    return names


def _metavar(f: FlagField) -> str:
    if f.path == "task.shard":
        return "INDEX[/COUNT]"
    if f.kind is list:
        return "PEER_ID" if f.path in ("attack.allies", "ops.operator_keys") else "MADDR"
    if f.kind is int:
        return "N"
    if f.kind is float:
        return "X"
    if f.kind is Path or f.key.endswith(("_file", "_dir")) or f.key == "identity":
        return "PATH"
    return "VALUE"


def _add_flag(group: Any, flag: str, f: FlagField, *, help_suffix: str = "") -> None:
    text = f"{f.help}{help_suffix}".replace("%", "%%")
    if f.kind is bool:
        group.add_argument(f"--{flag}", dest=f.path, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=text)
        return
    group.add_argument(f"--{flag}", dest=f.path, default=argparse.SUPPRESS, metavar=_metavar(f),
                       nargs="+" if f.kind is list else None, help=text)


def _convert(f: FlagField, raw: Any) -> Any:
    """Type one raw flag value; raises ConfigError naming the field."""
    if f.kind in (bool, str):
        return raw
    if f.kind is list:
        return list(raw)
    if f.kind is Path:
        return Path(raw)
    try:
        return f.kind(raw)
    except ValueError:
        raise ConfigError(f.path, raw, "an integer" if f.kind is int else "a number") from None


def _parse_shard(raw: str) -> dict[str, int]:
    index, sep, count = raw.partition("/")
    try:
        return {"task.shard": int(index), **({"task.num_shards": int(count)} if sep else {})}
    except ValueError:
        raise ConfigError("task.shard", raw, "INDEX or INDEX/COUNT, such as 0/4") from None


# -- parser --------------------------------------------------------------------------------------
def _command(sub: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description or help,
                                                     allow_abbrev=False)
    return parser


def _add_run(sub: Any) -> None:
    p = _command(sub, "run", "run one node until its rounds are done or it is stopped",
                 "Run one node. Flags override --config; each maps onto the config key in brackets. "
                 "The node prints its multiaddrs once it has joined; SIGINT or SIGTERM stops it cleanly.")
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"TOML config file (write a commented one with `{PROG} init`)")
    flds = node_fields()
    names = flag_names(flds)
    groups = {"": p.add_argument_group("node")}
    for section, cls in SECTIONS.items():
        groups[section] = p.add_argument_group(section, (cls.__doc__ or "").strip().splitlines()[0])
    for f in flds:
        suffix = f" [{f.path}]" if f.default in (None, []) else f" [{f.path}; default {f.default!r}]"
        if f.path == "task.shard":
            suffix = "; /COUNT also sets task.num_shards" + suffix
        _add_flag(groups[f.path.rpartition(".")[0]], names[f.path], f, help_suffix=suffix)


def swarm_fields() -> list[FlagField]:
    """The fields of :class:`SwarmOptions` that become ``swarm`` flags."""
    return [f for f in _fields_of(SwarmOptions, "swarm.") if f.key not in _SWARM_SKIPPED]


def _add_swarm(sub: Any) -> None:
    p = _command(sub, "swarm", "run N node processes on this machine (demo and tests)",
                 "Start N real `p2pnode run` processes on loopback (node 0 first, the others join through "
                 "it), show their progress, stop them, and write OUT/summary.json, OUT/metrics.jsonl and "
                 "the report (OUT/index.html with its plots). With no options it runs the demo default. "
                 "Arguments after `--` are "
                 f"appended to every node's command line, e.g. `{PROG} swarm --nodes 3 -- --batch-size 64`.")
    for f in swarm_fields():
        default = "runs/swarm-DATE-TIME" if f.key == "out" else f.default
        suffix = "" if default is None else f" (default {default})"
        _add_flag(p, f.key.replace("_", "-"), f, help_suffix=suffix)
    p.add_argument("--no-live", dest="live", action="store_false", help="no live progress bars")
    p.add_argument("node_args", nargs="*", metavar="-- NODE_ARGS", help="extra `p2pnode run` flags")


def _add_key_commands(sub: Any) -> None:
    default_key = NetworkConfig().identity
    key_help = f"key file (default {default_key})"
    p = _command(sub, "init", "write a commented default config file",
                 "Write every config key with its default and documentation as TOML.")
    p.add_argument("path", nargs="?", default=DEFAULT_CONFIG_FILE, help=f"(default ./{DEFAULT_CONFIG_FILE})")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = _command(sub, "keygen", "create an Ed25519 node key (mode 0600) and print its peer id",
                 "Create the Ed25519 key that is both the node's signing key and its libp2p identity.")
    p.add_argument("--identity", metavar="PATH", default=default_key, help=key_help)
    p.add_argument("--force", action="store_true", help="overwrite an existing key (its peer id is lost)")
    p.add_argument("--pow-bits", type=int, default=0, metavar="N",
                   help="grind a key whose peer id carries N bits of identity proof of work, for swarms run "
                        "with --identity-pow-bits N (about 2^N key generations; default 0)")
    p = _command(sub, "peer-id", "print the peer id of a key file")
    p.add_argument("--identity", metavar="PATH", default=default_key, help=key_help)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (exposed for tests and for the README's CLI reference)."""
    parser = _Parser(prog=PROG, description=DESCRIPTION, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_swarm(sub)
    _add_key_commands(sub)
    from p2pnode.cli_bench import add_bench
    from p2pnode.cli_ops import add_ops_commands
    from p2pnode.cli_report import add_report
    from p2pnode.sim.cli import add_simulate

    add_bench(sub)
    add_report(sub)
    add_simulate(sub)
    add_ops_commands(sub)
    return parser


# -- turning parsed flags into configs -------------------------------------------------------------
def node_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """The dotted config overrides for the ``run`` flags that were given, typed."""
    given = vars(ns)
    overrides = {f.path: _convert(f, given[f.path]) for f in node_fields()
                 if f.path in given and f.path != "task.shard"}
    if "task.shard" in given:
        shard = _parse_shard(given["task.shard"])
        count = overrides.get("task.num_shards", shard.get("task.num_shards"))
        if count != shard.get("task.num_shards", count):
            raise ConfigError("task.num_shards", count, f"the COUNT of --shard {given['task.shard']}")
        overrides.update(shard)
    return overrides


def node_config_from_args(ns: argparse.Namespace) -> NodeConfig:
    """Defaults, then ``--config``, then the given flags."""
    return load_config(ns.config, node_overrides(ns))


def swarm_options_from_args(ns: argparse.Namespace) -> SwarmOptions:
    given = vars(ns)
    values = {f.key: _convert(f, given[f.path]) for f in swarm_fields() if f.path in given}
    return SwarmOptions(**values, extra_args=list(ns.node_args))


# -- logging and commands --------------------------------------------------------------------------
def configure_logging(level: str) -> None:
    """Log to stderr: rich on a terminal, plain timestamped lines otherwise (node log files)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _LOG_HANDLER_NAME]:
        root.removeHandler(old)
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.set_name(_LOG_HANDLER_NAME)
    root.addHandler(handler)
    root.setLevel(_LOG_LEVELS.get(level, logging.INFO))


def _cmd_run(ns: argparse.Namespace) -> int:
    config = node_config_from_args(ns)
    configure_logging(config.output.log_level)
    from p2pnode.runtime import run_node  # torch and hivemind: only imported when a node really runs

    return run_node(config)


def _cmd_swarm(ns: argparse.Namespace) -> int:
    opts = swarm_options_from_args(ns)
    configure_logging(opts.log_level)
    try:
        summary = run_swarm(opts, live=ns.live)
    except SwarmStartError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0 if summary.get("all_finished") else 1


def _cmd_init(ns: argparse.Namespace) -> int:
    path = Path(ns.path)
    try:
        with open(path, "w" if ns.force else "x", encoding="utf-8") as fh:
            fh.write(default_toml())
    except FileExistsError:
        print(f"{PROG}: error: {path} already exists (pass --force to overwrite it)", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _grind(bits: int) -> Identity:
    """Grind a key with ``bits`` bits of identity proof of work, reporting progress on stderr."""
    import time

    if not 0 <= bits <= 32:
        raise ConfigError("--pow-bits", bits, "0 <= bits <= 32")
    if bits == 0:
        return Identity.generate()
    print(f"grinding a key with {bits} bits of identity proof of work: {2**bits:,} tries expected",
          file=sys.stderr)
    start = last = time.monotonic()

    def progress(tries: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 2.0:
            last = now
            rate = tries / (now - start)  # each try wins with probability 2^-bits, whatever came before
            print(f"  {tries:,} tries, {rate:,.0f} keys/s: {2**bits / rate:,.0f} s per key on average",
                  file=sys.stderr)

    identity, tries = grind_identity(bits, progress=progress)
    elapsed = time.monotonic() - start
    print(f"found one after {tries:,} tries in {elapsed:.1f} s", file=sys.stderr)
    return identity


def _cmd_keygen(ns: argparse.Namespace) -> int:
    target = Path(ns.identity).expanduser()
    if target.exists() and not ns.force:  # before grinding, which may take minutes
        raise IdentityError(f"{target} already exists (refusing to overwrite a key)")
    path = save_identity(_grind(ns.pow_bits), target, overwrite=ns.force)
    identity = load_identity(path)
    print(f"wrote {path} (mode 0600)", file=sys.stderr)
    print(identity.peer_id)
    return 0


def _cmd_peer_id(ns: argparse.Namespace) -> int:
    print(load_identity(Path(ns.identity)).peer_id)
    return 0


def _cmd_monitor(ns: argparse.Namespace) -> int:
    from p2pnode.cli_ops import cmd_monitor

    return cmd_monitor(ns)


def _cmd_control(ns: argparse.Namespace) -> int:
    from p2pnode.cli_ops import cmd_control

    return cmd_control(ns)


def _cmd_bench(ns: argparse.Namespace) -> int:
    from p2pnode.cli_bench import cmd_bench

    return cmd_bench(ns)


def _cmd_simulate(ns: argparse.Namespace) -> int:
    from p2pnode.sim.cli import cmd_simulate

    return cmd_simulate(ns)


def _cmd_report(ns: argparse.Namespace) -> int:
    from p2pnode.cli_report import cmd_report

    return cmd_report(ns)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run, "swarm": _cmd_swarm, "init": _cmd_init, "keygen": _cmd_keygen, "peer-id": _cmd_peer_id,
    "bench": _cmd_bench, "report": _cmd_report, "monitor": _cmd_monitor, "control": _cmd_control,
    "simulate": _cmd_simulate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``p2pnode`` console script and ``python -m p2pnode``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 2
    if ns.command is None:
        parser.print_help(sys.stderr)
        return 2
    if ns.command == "swarm" and ns.node_args and "--" not in args:
        print(f"{PROG} swarm: error: unexpected arguments {ns.node_args}; put node flags after `--`",
              file=sys.stderr)
        return 2
    try:
        return _COMMANDS[ns.command](ns)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except P2PNodeError as exc:  # IdentityError, TaskError, ...: not a usage error
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
