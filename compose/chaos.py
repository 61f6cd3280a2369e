#!/usr/bin/env python3
"""Fault injector for the p2pnode compose swarm: kills, freezes and partitions node containers.

It talks to the Docker Engine API over its unix socket with the standard library alone (http.client;
no docker CLI, no third-party package), so it runs in the p2pnode image itself (compose's ``chaos``
profile mounts the socket) or on the host::

    python3 compose/chaos.py --project p2pnode --interval 20 --down 10

After ``--start-delay`` seconds, then every ``--interval`` seconds, it picks one running, unpaused
container of the compose project's ``--service`` (default ``node``: the bootstrap node, the broker and
attackers are left alone) and one of ``--actions``:

    kill        SIGKILL the container (a crash); after ``--down`` seconds start it again (same volume:
                same key, and it resumes from its checkpoint)
    pause       freeze it (cgroup freezer: the process stops mid-flight, its sockets stay open); unpause
    disconnect  take it off its networks (a partition); reconnect it with the same address and aliases

Each action and its undo is one log line on stdout. SIGTERM/SIGINT undo what is still pending before it
exits, so stopping the chaos service leaves no node frozen or cut off. ``--count N`` stops after N
faults. Nothing here sends traffic anywhere but to the Docker socket.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

logger = logging.getLogger("chaos")

DEFAULT_SOCKET = "/var/run/docker.sock"
ACTIONS = ("kill", "pause", "disconnect")
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


class DockerError(RuntimeError):
    """The Engine API answered with an error status (or could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"docker API {status}: {message}")
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DockerEngine:
    """The few Docker Engine API calls chaos (and the compose smoke test) need; one connection a call."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------------------------------
    def _open(self, method: str, path: str, query: dict[str, Any] | None = None,
              body: bytes | BinaryIO | Iterable[bytes] | None = None,
              headers: dict[str, str] | None = None,
              timeout: float | None = None) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        url = path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        conn = _UnixConnection(self.socket_path, self.timeout if timeout is None else timeout)
        try:
            conn.request(method, url, body=body, headers=headers or {})
            response = conn.getresponse()
        except Exception:
            conn.close()
            raise
        if response.status >= 400:
            data = response.read()
            conn.close()
            try:
                message = json.loads(data).get("message", "")
            except ValueError:
                message = data.decode(errors="replace")
            raise DockerError(response.status, f"{method} {path}: {message.strip()}")
        return conn, response

    def request(self, method: str, path: str, query: dict[str, Any] | None = None,
                body: bytes | BinaryIO | Iterable[bytes] | None = None,
                headers: dict[str, str] | None = None, timeout: float | None = None) -> bytes:
        conn, response = self._open(method, path, query, body, headers, timeout)
        try:
            return response.read()
        finally:
            conn.close()

    def call(self, method: str, path: str, query: dict[str, Any] | None = None,
             payload: Any = None, timeout: float | None = None) -> Any:
        """A JSON request (``payload`` as JSON body) whose JSON answer (or None) is returned."""
        body, headers = None, {}
        if payload is not None:
            body, headers = json.dumps(payload).encode(), {"Content-Type": "application/json"}
        data = self.request(method, path, query, body, headers, timeout)
        return json.loads(data) if data.strip() else None

    def stream(self, method: str, path: str, query: dict[str, Any] | None = None,
               body: bytes | BinaryIO | Iterable[bytes] | None = None,
               headers: dict[str, str] | None = None,
               timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """A request whose answer is a stream of JSON objects (build and import progress)."""
        conn, response = self._open(method, path, query, body, headers, timeout)
        try:
            decoder, buffer = json.JSONDecoder(), ""
            while chunk := response.read1(65536):
                buffer += chunk.decode(errors="replace")
                while True:
                    buffer = buffer.lstrip()
                    if not buffer:
                        break
                    try:
                        obj, end = decoder.raw_decode(buffer)
                    except ValueError:
                        break
                    buffer = buffer[end:]
                    yield obj
        finally:
            conn.close()

    # -- calls ------------------------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return self.request("GET", "/_ping", timeout=5.0) == b"OK"
        except (OSError, DockerError, http.client.HTTPException):
            return False

    def containers(self, labels: Iterable[str] = (), *, all: bool = False) -> list[dict[str, Any]]:
        filters = json.dumps({"label": list(labels)}) if labels else None
        return self.call("GET", "/containers/json", {"all": "1" if all else "0", "filters": filters})

    def inspect(self, container: str) -> dict[str, Any]:
        return self.call("GET", f"/containers/{container}/json")

    def kill(self, container: str, sig: str = "KILL") -> None:
        self.call("POST", f"/containers/{container}/kill", {"signal": sig})

    def start(self, container: str) -> None:
        self.call("POST", f"/containers/{container}/start")  # 304 (already running) is not an error

    def pause(self, container: str) -> None:
        self.call("POST", f"/containers/{container}/pause")

    def unpause(self, container: str) -> None:
        self.call("POST", f"/containers/{container}/unpause")

    def disconnect(self, network: str, container: str) -> None:
        self.call("POST", f"/networks/{network}/disconnect", payload={"Container": container, "Force": True})

    def connect(self, network: str, container: str, ipv4: str | None = None,
                aliases: list[str] | None = None) -> None:
        endpoint: dict[str, Any] = {}
        if ipv4:
            endpoint["IPAMConfig"] = {"IPv4Address": ipv4}
        if aliases:
            endpoint["Aliases"] = aliases
        self.call("POST", f"/networks/{network}/connect",
                  payload={"Container": container, "EndpointConfig": endpoint})


# -- faults -------------------------------------------------------------------------------------------
class Fault:
    """One fault applied to one container, with the information needed to undo it."""

    def __init__(self, engine: DockerEngine, action: str, container: dict[str, Any]) -> None:
        self.engine = engine
        self.action = action
        self.id: str = container["Id"]
        self.name: str = container["Names"][0].lstrip("/") if container.get("Names") else self.id[:12]
        self.networks: dict[str, dict[str, Any]] = {}

    def apply(self) -> None:
        if self.action == "kill":
            self.engine.kill(self.id)
        elif self.action == "pause":
            self.engine.pause(self.id)
        elif self.action == "disconnect":
            info = self.engine.inspect(self.id)
            for network, endpoint in (info["NetworkSettings"].get("Networks") or {}).items():
                self.networks[network] = {"ipv4": endpoint.get("IPAddress") or None,
                                          "aliases": endpoint.get("Aliases") or None}
            for network in self.networks:
                self.engine.disconnect(network, self.id)
        else:
            raise ValueError(f"unknown action {self.action!r}")
        detail = " ".join(f"{net}={ep['ipv4']}" for net, ep in self.networks.items())
        logger.info("%s %s (%s)%s", self.action, self.name, self.id[:12], f" from {detail}" if detail else "")

    def undo(self) -> None:
        try:
            if self.action == "kill":
                self.engine.start(self.id)
                logger.info("start %s (%s) after kill", self.name, self.id[:12])
            elif self.action == "pause":
                self.engine.unpause(self.id)
                logger.info("unpause %s (%s)", self.name, self.id[:12])
            elif self.action == "disconnect":
                for network, endpoint in self.networks.items():
                    self.engine.connect(network, self.id, endpoint["ipv4"], endpoint["aliases"])
                    logger.info("reconnect %s (%s) to %s as %s", self.name, self.id[:12], network,
                                endpoint["ipv4"])
        except DockerError as exc:
            # The container may have been removed meanwhile (compose down, scale down): nothing to undo.
            logger.warning("could not undo %s of %s: %s", self.action, self.name, exc)


def own_project(engine: DockerEngine) -> str | None:
    """The compose project of the container this runs in (its hostname is its container id)."""
    try:
        info = engine.inspect(socket.gethostname())
    except (DockerError, OSError):
        return None
    return (info.get("Config", {}).get("Labels") or {}).get(PROJECT_LABEL)


def targets(engine: DockerEngine, project: str, services: list[str]) -> list[dict[str, Any]]:
    found = []
    for service in services:
        found += [c for c in engine.containers([f"{PROJECT_LABEL}={project}", f"{SERVICE_LABEL}={service}"])
                  if c.get("State") == "running"]
    return sorted(found, key=lambda c: c["Id"])


def run(engine: DockerEngine, project: str, services: list[str], actions: list[str], interval: float,
        down: float, count: int, rng: random.Random, stop: threading.Event, start_delay: float = 0.0) -> int:
    """Inject faults until ``stop`` is set or ``count`` were made (0: no limit); returns how many."""
    done, wait = 0, start_delay
    logger.info("project %s, services %s, actions %s, a fault every %gs held %gs, the first after %gs",
                project, ",".join(services), ",".join(actions), interval, down, start_delay)
    while not stop.wait(wait):
        wait = interval
        candidates = targets(engine, project, services)
        if not candidates:
            logger.info("no running container of %s in project %s; waiting", ",".join(services), project)
            continue
        fault = Fault(engine, rng.choice(actions), rng.choice(candidates))
        try:
            fault.apply()
        except DockerError as exc:
            logger.warning("%s %s failed: %s", fault.action, fault.name, exc)
            continue
        stop.wait(down)
        fault.undo()
        done += 1
        if count and done >= count:
            break
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", default=os.environ.get("CHAOS_SOCKET", DEFAULT_SOCKET),
                        help="Docker Engine API socket (default %(default)s)")
    parser.add_argument("--project", default=os.environ.get("CHAOS_PROJECT"),
                        help="compose project (default: this container's own, from its labels)")
    parser.add_argument("--service", action="append", dest="services",
                        help="compose service whose containers are hit (repeatable; default node)")
    parser.add_argument("--actions", default=os.environ.get("CHAOS_ACTIONS", ",".join(ACTIONS)),
                        help="comma-separated subset of kill,pause,disconnect (default %(default)s)")
    parser.add_argument("--interval", type=float, default=float(os.environ.get("CHAOS_INTERVAL_S", "30")),
                        help="seconds between two faults (default %(default)s)")
    parser.add_argument("--down", type=float, default=float(os.environ.get("CHAOS_DOWN_S", "15")),
                        help="seconds a fault lasts before it is undone (default %(default)s)")
    parser.add_argument("--start-delay", type=float,
                        default=float(os.environ.get("CHAOS_START_DELAY_S", "60")),
                        help="seconds before the first fault, for the swarm to form (default %(default)s)")
    parser.add_argument("--count", type=int, default=int(os.environ.get("CHAOS_COUNT", "0")),
                        help="stop after this many faults (default 0: run until stopped)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s chaos: %(message)s")

    actions = [a.strip() for a in args.actions.split(",") if a.strip()]
    unknown = sorted(set(actions) - set(ACTIONS))
    if not actions or unknown:
        parser.error(f"--actions: unknown {unknown} (choose from {','.join(ACTIONS)})")
    if args.interval <= 0 or args.down < 0 or args.count < 0 or args.start_delay < 0:
        parser.error("--interval must be > 0, --down, --count and --start-delay >= 0")
    engine = DockerEngine(args.socket)
    if not engine.ping():
        logger.error("no Docker Engine API at %s (mount the socket: see compose/README.md)", args.socket)
        return 1
    project = args.project or own_project(engine)
    if not project:
        parser.error("--project is needed when chaos does not run in a container of the compose project")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    done = run(engine, project, args.services or ["node"], actions, args.interval, args.down, args.count,
               random.Random(args.seed), stop, args.start_delay)
    logger.info("stopped after %d fault(s)", done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
