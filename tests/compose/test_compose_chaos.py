"""compose/chaos.py against a fake Docker Engine API on a unix socket (no Docker needed; runs everywhere).

The fake answers the calls chaos makes the way dockerd does (paths, query strings, JSON bodies, status
codes) and records them, so these tests check what chaos asks Docker to do: which containers it picks,
that every fault is undone with what it needs (the same address and aliases after a partition), also when
it is stopped mid-fault, and that the client reports API errors and parses streamed JSON.
"""

from __future__ import annotations

import http.server
import json
import random
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from compose_harness import chaos

PROJECT = "proj"


def _container(cid: str, service: str, project: str = PROJECT, state: str = "running") -> dict[str, Any]:
    return {"Id": cid * 8, "Names": [f"/{project}-{service}-{cid}"], "State": state,
            "Labels": {chaos.PROJECT_LABEL: project, chaos.SERVICE_LABEL: service},
            "Networks": {f"{project}_swarm": {"IPAddress": f"172.30.57.{100 + len(cid)}",
                                              "Aliases": [service, cid * 3]}}}


class FakeDocker:
    """The state and the call log of the fake daemon."""

    def __init__(self, containers: list[dict[str, Any]]) -> None:
        self.containers = {c["Id"]: c for c in containers}
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        with self.lock:
            self.calls.append((method, path, query, body))
        parts = path.strip("/").split("/")
        if path == "/_ping":
            return 200, b"OK"
        if path == "/containers/json":
            labels = json.loads(query.get("filters", "{}")).get("label", [])
            wanted = [label.partition("=") for label in labels]
            found = [c for c in self.containers.values()
                     if all(c["Labels"].get(key) == value for key, _, value in wanted)
                     and (query.get("all") == "1" or c["State"] == "running")]
            return 200, [{k: c[k] for k in ("Id", "Names", "State", "Labels")} for c in found]
        if parts[0] == "containers" and len(parts) == 3:
            c = self.containers.get(parts[1])
            if c is None:
                return 404, {"message": f"No such container: {parts[1]}"}
            if parts[2] == "json":
                return 200, {"Id": c["Id"], "Config": {"Labels": c["Labels"]},
                             "NetworkSettings": {"Networks": c["Networks"]}}
            new_state = {"kill": "exited", "start": "running", "pause": "paused", "unpause": "running"}
            if parts[2] in new_state:
                if parts[2] == "start" and c["State"] == "running":
                    return 304, None
                c["State"] = new_state[parts[2]]
                return 204, None
        if parts[0] == "networks" and len(parts) == 3:
            c = self.containers[body["Container"]]
            if parts[2] == "disconnect":
                c["Networks"].pop(parts[1])
            else:
                endpoint = body["EndpointConfig"]
                c["Networks"][parts[1]] = {"IPAddress": endpoint["IPAMConfig"]["IPv4Address"],
                                           "Aliases": endpoint["Aliases"]}
            return 200, None
        return 404, {"message": f"page not found: {method} {path}"}


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeDocker, Any]]:
    docker = FakeDocker([_container("a", "node"), _container("b", "node"),
                         _container("c", "node", state="exited"), _container("d", "bootstrap"),
                         _container("e", "node", project="other")])

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            query = dict(urllib.parse.parse_qsl(url.query))
            status, payload = docker.handle(self.command, url.path, query, body)
            if not isinstance(payload, bytes):
                payload = b"" if payload is None else json.dumps(payload).encode()
            data = payload
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:  # nothing after the headers of a 204 or 304: the client may have hung up already
                self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

        def address_string(self) -> str:  # a unix socket has no client address
            return "fake"

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    path = tmp_path / "docker.sock"
    server = Server(str(path), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield docker, chaos.DockerEngine(str(path), timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _actions(docker: FakeDocker) -> list[tuple[str, str]]:
    """(verb, container id) of every state-changing call, in order."""
    out = []
    for method, path, _, body in docker.calls:
        parts = path.strip("/").split("/")
        if method == "POST" and parts[0] == "containers":
            out.append((parts[2], parts[1]))
        elif method == "POST" and parts[0] == "networks":
            assert body is not None
            out.append((parts[2], body["Container"]))
    return out


def test_targets_are_running_containers_of_the_project_and_service(fake: tuple[FakeDocker, Any]) -> None:
    docker, engine = fake
    assert [c["Id"] for c in chaos.targets(engine, PROJECT, ["node"])] == ["a" * 8, "b" * 8]
    assert [c["Id"] for c in chaos.targets(engine, PROJECT, ["bootstrap"])] == ["d" * 8]
    assert chaos.targets(engine, "nobody", ["node"]) == []


@pytest.mark.parametrize(("action", "verbs"), [("kill", ["kill", "start"]), ("pause", ["pause", "unpause"]),
                                               ("disconnect", ["disconnect", "connect"])])
def test_each_fault_is_undone(fake: tuple[FakeDocker, Any], action: str, verbs: list[str]) -> None:
    docker, engine = fake
    before = json.loads(json.dumps({cid: c["Networks"] for cid, c in docker.containers.items()}))
    done = chaos.run(engine, PROJECT, ["node"], [action], interval=0.01, down=0.0, count=3,
                     rng=random.Random(1), stop=threading.Event())
    assert done == 3
    acts = _actions(docker)
    assert [verb for verb, _ in acts] == verbs * 3
    assert all(cid in ("a" * 8, "b" * 8) for _, cid in acts), acts
    assert all(c["State"] == s for c, s in zip(docker.containers.values(),
                                                   ["running", "running", "exited", "running", "running"]))
    # The same address and aliases after a partition (the node announced that address to its peers).
    assert {cid: c["Networks"] for cid, c in docker.containers.items()} == before
    if action == "kill":
        kills = [query for _, path, query, _ in docker.calls if path.endswith("/kill")]
        assert kills == [{"signal": "KILL"}] * 3
    if action == "disconnect":
        cuts = [body for _, path, _, body in docker.calls if path.endswith("/disconnect")]
        assert len(cuts) == 3
        assert all(body["Force"] is True for body in cuts)


def test_stop_during_a_fault_undoes_it(fake: tuple[FakeDocker, Any]) -> None:
    docker, engine = fake
    stop = threading.Event()
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(chaos.run(
        engine, PROJECT, ["node"], ["pause"], interval=0.01, down=60.0, count=0, rng=random.Random(0),
        stop=stop)))
    worker.start()
    deadline = time.monotonic() + 10
    while not any(verb == "pause" for verb, _ in _actions(docker)) and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    stop.set()
    worker.join(10)
    assert not worker.is_alive()
    assert time.monotonic() - started < 5
    assert [verb for verb, _ in _actions(docker)] == ["pause", "unpause"]
    assert result == [1]
    assert all(c["State"] != "paused" for c in docker.containers.values())


def test_start_delay_holds_the_first_fault(fake: tuple[FakeDocker, Any]) -> None:
    docker, engine = fake
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    done = chaos.run(engine, PROJECT, ["node"], ["kill"], interval=0.01, down=0.0, count=0,
                     rng=random.Random(0), stop=stop, start_delay=30.0)
    timer.join()
    assert done == 0
    assert _actions(docker) == []


def test_api_errors_and_missing_containers(fake: tuple[FakeDocker, Any]) -> None:
    docker, engine = fake
    with pytest.raises(chaos.DockerError, match="No such container") as caught:
        engine.pause("nothere")
    assert caught.value.status == 404
    # Undoing a fault on a container that is gone meanwhile is logged, not raised.
    fault = chaos.Fault(engine, "pause", {"Id": "nothere", "Names": ["/x"]})
    fault.undo()
    assert engine.ping() is True
    assert chaos.DockerEngine("/nonexistent/docker.sock").ping() is False
    assert _actions(docker) == [("pause", "nothere"), ("unpause", "nothere")]


def test_stream_parses_json_objects_split_anywhere(fake: tuple[FakeDocker, Any], monkeypatch: Any) -> None:
    _, engine = fake
    messages = [{"stream": "Step 1/2 : FROM x\n"}, {"stream": "ok {braces} \"quoted\"\n"},
                {"aux": {"ID": "sha"}}]
    raw = "\r\n".join(json.dumps(m) for m in messages).encode()

    class Chunks:
        status = 200

        def __init__(self) -> None:
            self.parts = [raw[i:i + 7] for i in range(0, len(raw), 7)]

        def read1(self, n: int) -> bytes:
            return self.parts.pop(0) if self.parts else b""

    class Conn:
        def close(self) -> None:
            pass

    monkeypatch.setattr(engine, "_open", lambda *a, **k: (Conn(), Chunks()))
    assert list(engine.stream("POST", "/build")) == messages


def test_command_line_rejects_unknown_actions(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        chaos.main(["--project", PROJECT, "--actions", "kill,explode"])
    assert exited.value.code == 2
    assert "explode" in capsys.readouterr().err
