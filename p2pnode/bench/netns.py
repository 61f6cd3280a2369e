"""Network namespaces for fault injection: N node namespaces on a private bridge, faults by iptables/tc.

Layout (everything created here is named ``<prefix>-…`` with a prefix unique to this process)::

    <prefix>-br   bridge namespace: br0, and v0 … v{N-1} (the bridge ends of the veth pairs)
    <prefix>-i    node i's namespace: eth0 = 10.213.7.(i+1)/24 (the other end of v{i}), lo

Nothing is created in the host's own namespace and the node namespaces have no default route, so a
packet can only go to another namespace of the same lab. Every node process must run inside its
namespace (:meth:`NetnsLab.exec_prefix`): a packet sent from the host namespace to a lab address could
leave through the host's default route.

Faults (each one undone by :meth:`NetnsLab.heal`):

- :meth:`NetnsLab.partition`: iptables DROP, in every node namespace, of all traffic to and from the
  addresses of the other group (silence, as a cut cable: no RST, connections hang until timeouts);
- :meth:`NetnsLab.loss`: iptables ``-m statistic --mode random --probability P -j DROP`` on packets
  arriving at eth0 (each packet between two lossy nodes is dropped once with probability P);
- :meth:`NetnsLab.cap`: ``tc … tbf`` on both directions of one node's link (eth0 egress, and the
  bridge end's egress, which is the node's ingress). This kernel has no ``netem``: no added delay.

:meth:`NetnsLab.down` kills what is still running in the lab's namespaces (found with
``ip netns pids``; only processes inside these namespaces, all started by this lab's user) and
deletes them; it runs on any failure of :meth:`NetnsLab.up` and when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from types import TracebackType

from p2pnode.errors import P2PNodeError
from p2pnode.swarm import Swarm, SwarmOptions

logger = logging.getLogger(__name__)

TOOLS = ("ip", "iptables", "tc")
FAULT_CHAIN = "P2PN-FAULT"
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
_SEEN, _LOST = "p2pn-seen", "p2pn-lost"  # iptables comments of the loss rules


class NetnsError(P2PNodeError):
    """A namespace, link, address or fault could not be set up (the command and its stderr)."""


def find_tool(name: str) -> str | None:
    """Full path of ``name`` on PATH or in the sbin folders (PATH often lacks them)."""
    found = shutil.which(name)
    if found:
        return found
    return next((f"{d}/{name}" for d in _SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, a tool missing), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (os.geteuid() != 0)"
    missing = [t for t in TOOLS if find_tool(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install iproute2 iptables)"
    return None


class NetnsLab:
    """``nodes`` network namespaces joined by a bridge that lives in a namespace of its own.

    Parameters
    ----------
    nodes
        Number of node namespaces (1 … 250).
    subnet
        A private /24 for the node addresses (node i gets host i + 1).
    prefix
        Name prefix of every namespace (default ``p2pn<pid>``, with a counter per lab of this
        process); at most 11 characters so that names stay short.

    Use it as a context manager (``up`` on enter, ``down`` on exit), or call :meth:`down` in a
    ``finally``.
    """

    _count = 0

    def __init__(self, nodes: int, *, subnet: str = "10.213.7.0/24", prefix: str | None = None) -> None:
        net = ipaddress.ip_network(subnet)
        if not (isinstance(nodes, int) and 1 <= nodes <= min(250, net.num_addresses - 2)):
            raise ValueError(f"nodes must be 1 … 250 and fit in {subnet}, got {nodes!r}")
        if not net.is_private or net.version != 4:
            raise ValueError(f"subnet must be a private IPv4 network, got {subnet}")
        NetnsLab._count += 1
        self.prefix = prefix or f"p2pn{os.getpid()}{'' if NetnsLab._count == 1 else NetnsLab._count}"
        if len(self.prefix) > 11:
            raise ValueError(f"prefix must have at most 11 characters, got {self.prefix!r}")
        self.nodes, self.net = nodes, net
        self._tools = {t: find_tool(t) or t for t in TOOLS}
        self._created: list[str] = []

    # -- names -------------------------------------------------------------------------------------
    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def ns(self, i: int) -> str:
        """Namespace of node ``i``."""
        return f"{self.prefix}-{i}"

    def addr(self, i: int) -> str:
        """IPv4 address of node ``i``."""
        return str(self.net.network_address + i + 1)

    def exec_prefix(self, i: int) -> list[str]:
        """Command prefix that runs a program inside node ``i``'s namespace (``ip netns exec`` execs it,
        so the pid of the started process is the program's own)."""
        return [self._tools["ip"], "netns", "exec", self.ns(i)]

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> NetnsLab:
        self.up()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def _run(self, *args: str, ns: str | None = None, tool: str = "ip") -> None:
        if ns is None:
            cmd = [self._tools[tool], *args]
        elif tool == "ip":
            cmd = [self._tools["ip"], "-n", ns, *args]
        else:
            cmd = [self._tools["ip"], "netns", "exec", ns, self._tools[tool], *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise NetnsError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")

    def up(self) -> None:
        """Create the namespaces, the bridge, the veth pairs and the addresses; on failure undo all.

        Raises
        ------
        NetnsError
            A command failed (its stderr is in the message); nothing of the lab is left behind.
        """
        try:
            for name in [self.bridge_ns, *(self.ns(i) for i in range(self.nodes))]:
                self._run("netns", "add", name)
                self._created.append(name)
            br = self.bridge_ns
            self._run("link", "add", "br0", "type", "bridge", ns=br)
            self._run("link", "set", "br0", "up", ns=br)
            for i in range(self.nodes):
                self._run("link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", self.ns(i),
                          ns=br)
                self._run("link", "set", f"v{i}", "master", "br0", "up", ns=br)
                self._run("addr", "add", f"{self.addr(i)}/{self.net.prefixlen}", "dev", "eth0", ns=self.ns(i))
                self._run("link", "set", "eth0", "up", ns=self.ns(i))
                self._run("link", "set", "lo", "up", ns=self.ns(i))
                self._run("-w", "-N", FAULT_CHAIN, ns=self.ns(i), tool="iptables")
                for hook in ("INPUT", "OUTPUT"):
                    self._run("-w", "-A", hook, "-j", FAULT_CHAIN, ns=self.ns(i), tool="iptables")
        except BaseException:
            self.down()
            raise
        logger.info("netns lab %s up: %d nodes on %s", self.prefix, self.nodes, self.net)

    def pids(self) -> dict[str, list[int]]:
        """Processes still running in each namespace of the lab (``ip netns pids``)."""
        found: dict[str, list[int]] = {}
        for name in self._created:
            proc = subprocess.run([self._tools["ip"], "netns", "pids", name], capture_output=True, text=True,
                                  timeout=30)
            pids = [int(p) for p in proc.stdout.split() if p.isdigit()]
            if pids:
                found[name] = pids
        return found

    def _wait_empty(self, grace_s: float) -> dict[str, list[int]]:
        deadline = time.monotonic() + grace_s
        while (leftovers := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return leftovers

    def down(self, grace_s: float = 3.0) -> None:
        """Stop what still runs in the lab's namespaces and delete them: wait ``grace_s`` for processes
        to exit, then SIGTERM them, wait again, then SIGKILL. Idempotent; never raises for a namespace
        that is already gone."""
        leftovers = self._wait_empty(grace_s)  # a stopped node's DHT child may still be exiting
        if leftovers:
            logger.warning("netns lab %s: processes still running at teardown: %s", self.prefix, leftovers)
            _signal_all(leftovers.values(), signal.SIGTERM)
            _signal_all(self._wait_empty(grace_s).values(), signal.SIGKILL)
        for name in reversed(self._created):
            proc = subprocess.run([self._tools["ip"], "netns", "del", name], capture_output=True, text=True,
                                  timeout=30)
            if proc.returncode != 0:
                logger.warning("could not delete namespace %s: %s", name, proc.stderr.strip())
        self._created.clear()

    # -- faults ------------------------------------------------------------------------------------
    def _iptables(self, i: int, *rule: str) -> None:
        self._run("-w", *rule, ns=self.ns(i), tool="iptables")

    def partition(self, group_a: Sequence[int], group_b: Sequence[int]) -> None:
        """Drop every packet between a node of ``group_a`` and one of ``group_b`` (both directions)."""
        for here, there in ((group_a, group_b), (group_b, group_a)):
            for i in here:
                for j in there:
                    self._iptables(i, "-A", FAULT_CHAIN, "-s", self.addr(j), "-j", "DROP")
                    self._iptables(i, "-A", FAULT_CHAIN, "-d", self.addr(j), "-j", "DROP")
        logger.info("partition: %s | %s", list(group_a), list(group_b))

    def loss(self, nodes: Iterable[int], probability: float) -> None:
        """Drop packets arriving at each of ``nodes`` from the bridge with ``probability``."""
        if not 0.0 < probability < 1.0:
            raise ValueError(f"probability must be in (0, 1), got {probability}")
        for i in nodes:
            # a rule without target only counts: what arrived, before the random drop
            self._iptables(i, "-A", FAULT_CHAIN, "-i", "eth0", "-m", "comment", "--comment", _SEEN)
            self._iptables(i, "-A", FAULT_CHAIN, "-i", "eth0", "-m", "statistic", "--mode", "random",
                           "--probability", f"{probability:g}", "-m", "comment", "--comment", _LOST,
                           "-j", "DROP")

    def loss_counts(self, i: int) -> tuple[int, int]:
        """``(arrived, dropped)`` packets at node ``i`` since :meth:`loss` (from the rules' counters)."""
        cmd = [*self.exec_prefix(i), self._tools["iptables"], "-w", "-L", FAULT_CHAIN, "-v", "-x", "-n"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise NetnsError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
        counts = {_SEEN: 0, _LOST: 0}
        for line in proc.stdout.splitlines():
            for tag in counts:
                if f"/* {tag} */" in line:
                    counts[tag] += int(line.split()[0])
        return counts[_SEEN], counts[_LOST]

    def cap(self, i: int, rate: str, *, burst: str = "32kbit", latency: str = "400ms") -> None:
        """Limit node ``i``'s link to ``rate`` (tc syntax, e.g. ``1mbit``) in both directions (tbf)."""
        tbf = ("root", "tbf", "rate", rate, "burst", burst, "latency", latency)
        self._run("qdisc", "replace", "dev", "eth0", *tbf, ns=self.ns(i), tool="tc")
        self._run("qdisc", "replace", "dev", f"v{i}", *tbf, ns=self.bridge_ns, tool="tc")

    def heal(self) -> None:
        """Undo every fault: flush the fault chains and remove the rate limits."""
        for i in range(self.nodes):
            self._iptables(i, "-F", FAULT_CHAIN)
            for dev, ns in (("eth0", self.ns(i)), (f"v{i}", self.bridge_ns)):
                with contextlib.suppress(NetnsError):  # no qdisc of ours there
                    self._run("qdisc", "del", "dev", dev, "root", ns=ns, tool="tc")
        logger.info("healed: fault rules and rate limits removed")


def _signal_all(groups: Iterable[list[int]], sig: signal.Signals) -> None:
    for pids in groups:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


class NetnsSwarm(Swarm):
    """A :class:`~p2pnode.swarm.Swarm` whose node i runs inside ``lab``'s namespace i, listening on the
    lab address of that namespace (same process contract and flags as the loopback swarm)."""

    def __init__(self, opts: SwarmOptions, lab: NetnsLab, *, env: dict[str, str] | None = None) -> None:
        if opts.nodes > lab.nodes:
            raise ValueError(f"{opts.nodes} nodes do not fit in a lab of {lab.nodes} namespaces")
        super().__init__(opts, env=env)
        self.lab = lab

    def _command(self, i: int) -> list[str]:
        cmd = super()._command(i)
        at = cmd.index("--host-maddrs") + 1
        cmd[at] = f"/ip4/{self.lab.addr(i)}/tcp/0"
        return [*self.lab.exec_prefix(i), *cmd]
