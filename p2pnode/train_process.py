"""Local training in a child process of its own (``--train-process``).

Why: in the daemon the event loop (libp2p streams, framing, envelopes, codecs) and the training thread
share one interpreter lock. A training step of a small model on a GPU is launch-bound: the thread needs
the lock for nearly all of its ~2 ms, so every millisecond the event loop holds the lock is lost to
training. Measured on an H100 (BENCHMARKS.md, "GPU path"): the event loop holds the lock about 7.6 ms per
exchange, and gossip cost 16-31% of local step throughput at H = 20, almost all of it inside the training
calls. In a process of its own the training loop has a lock of its own.

The child owns the model, its optimizer and the shard, built exactly as the in-thread trainer is
(``p2pnode.runtime.build_trainer``). The parent holds a :class:`TrainerProcess`, which has the
:class:`~p2pnode.trainer.LocalTrainer` methods the gossip node calls. Two pipes join them: one carries
``train_steps`` calls only, the other every other request. While it trains, the child serves the second
pipe between two steps, so a merge lands mid-training as it does with the in-thread trainer's per-step lock;
evaluations run in a thread of the child beside the training, as they do in the daemon.

Messages on the pipes are msgpack, or ``torch.save`` archives read back with
``torch.load(weights_only=True)`` where they hold tensors; flat model vectors follow a message as raw bytes.
No pickled objects. The first message gives the child the node's configuration (as the TOML layout).

The child is ``python -m p2pnode.train_process`` started with the two socket ends: a fresh interpreter (no
fork of a process with an event loop, threads and CUDA) that, unlike :mod:`multiprocessing`'s spawn, never
re-runs the parent's ``__main__``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import msgpack
import torch
from torch import nn

from p2pnode.config import NodeConfig, config_from_dict
from p2pnode.errors import TaskError, TrainProcessError
from p2pnode.trainer import LocalTrainer, model_spec

logger = logging.getLogger(__name__)

_POLL_S = 0.5  # how often a caller waiting for a reply checks that the child is still alive


class _Closed(Exception):
    """Raised inside the child's training loop when the parent asked it to stop."""


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, tuple | list):
        return any(_has_tensor(x) for x in obj)
    if isinstance(obj, dict):
        return any(_has_tensor(x) for x in obj.values())
    return False


def _pack(obj: Any) -> bytes:
    """msgpack for plain data (most messages: a few µs), a ``torch.save`` archive when it holds tensors."""
    if not _has_tensor(obj):
        try:
            return b"M" + msgpack.packb(obj)
        except (TypeError, ValueError, OverflowError):  # e.g. a non-string key: torch.save takes it
            pass
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)  # the zip format is 10x slower to write
    return b"T" + buf.getvalue()


def _unpack(data: bytes) -> Any:
    if data[:1] == b"M":
        return msgpack.unpackb(data[1:], strict_map_key=False)
    if data[:1] == b"T":
        return torch.load(io.BytesIO(data[1:]), weights_only=True)
    raise ValueError(f"unknown message format {data[:1]!r}")


_FLAT = "__flat__"  # a message's place holder for a flat vector that follows as raw bytes


def _is_flat(x: Any) -> bool:
    return (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.dim() == 1
            and x.device.type == "cpu")


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    """Send a tuple; its flat float32 vectors (the model, a merge delta) go as raw bytes after a header."""
    flats = [x for x in message if _is_flat(x)]
    header = tuple((_FLAT, x.numel()) if _is_flat(x) else x for x in message)
    conn.send_bytes(_pack(header))
    for flat in flats:
        conn.send_bytes(flat.contiguous().numpy().data)


def _receive_message(conn: Connection) -> tuple[Any, ...]:
    header = _unpack(conn.recv_bytes())
    if not isinstance(header, tuple | list):
        raise TypeError(f"expected a tuple, got {type(header).__name__}")
    parts = []
    for x in header:
        if isinstance(x, tuple | list) and len(x) == 2 and x[0] == _FLAT:
            raw = conn.recv_bytes()
            if len(raw) != 4 * x[1]:
                raise ValueError(f"flat vector of {len(raw)} bytes, header said {x[1]} floats")
            x = torch.frombuffer(bytearray(raw), dtype=torch.float32)
        parts.append(x)
    return tuple(parts)


_RERAISED: dict[str, type[Exception]] = {"ValueError": ValueError, "RuntimeError": RuntimeError,
                                         "TaskError": TaskError}


# the LocalTrainer methods a parent may call on the control pipe
_METHODS = frozenset({"get_flat", "set_flat_", "add_flat_", "reset_momentum", "evaluate", "class_f1",
                      "state_dict", "load_state_dict"})
# answered by a thread of the child while training goes on: they read the model under the trainer's lock
# into private copies (as the in-thread trainer's callers do from worker threads), then take a while
_BESIDE_TRAINING = frozenset({"evaluate", "class_f1"})


def _error_reply(exc: BaseException) -> tuple[str, str, str]:
    return ("error", type(exc).__name__, str(exc))


class _Server:
    """The child's side: answers one request at a time on the control pipe."""

    def __init__(self, trainer: LocalTrainer, conn: Connection) -> None:
        self.trainer, self.conn = trainer, conn
        self.closed = False

    def serve_pending(self) -> None:
        """Answer every request already waiting; raises :class:`_Closed` once the parent said close."""
        while not self.closed and self.conn.poll():
            self.serve_one()
        if self.closed:
            raise _Closed

    def serve_one(self) -> None:
        try:
            op, *args = _receive_message(self.conn)
        except (EOFError, OSError):  # the parent is gone
            self.closed = True
            return
        if op == "close":
            self.closed = True
            _send(self.conn, ("ok", None))
        elif op in _BESIDE_TRAINING:
            # the caller waits for this reply before it sends anything else, so this thread is the only
            # writer on the pipe until it has answered
            threading.Thread(target=self.answer, args=(op, args), name=f"p2pnode-train-{op}",
                             daemon=True).start()
        else:
            self.answer(op, args)

    def answer(self, op: str, args: list[Any]) -> None:
        try:
            reply: Any = ("ok", self.handle(op, args))
        except Exception as exc:  # every failure goes back to the caller, who raises it
            reply = _error_reply(exc)
        try:
            _send(self.conn, reply)
        except OSError:  # the parent is gone; the main loop sees it too
            pass

    def handle(self, op: str, args: list[Any]) -> Any:
        if op == "steps_done":
            return self.trainer.steps_done
        if op not in _METHODS:
            raise ValueError(f"unknown request {op!r}")
        return getattr(self.trainer, op)(*args)


def _config_layout(config: NodeConfig) -> dict[str, Any]:
    """``config`` in the TOML layout that :func:`~p2pnode.config.config_from_dict` reads (None left out)."""
    def keep(d: dict[str, Any]) -> dict[str, Any]:
        return {k: keep(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    return keep(dataclasses.asdict(config))


def _serve(train_conn: Connection, control_conn: Connection) -> None:
    """The training process's main function."""
    from p2pnode.proc import die_with_parent
    from p2pnode.runtime import build_trainer, lower_thread_priority
    from p2pnode.trainer import limit_threads

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent shuts us down
    try:
        (layout,) = _receive_message(control_conn)
    except EOFError:
        return
    try:
        config = config_from_dict(layout)
        limit_threads(config.threads)
        if config.worker_nice:
            lower_thread_priority(config.worker_nice)
        trainer = build_trainer(config)
    except Exception as exc:
        _send(control_conn, _error_reply(exc))
        return
    _send(control_conn, ("ready", {
        "num_params": trainer.num_params, "num_classes": trainer.num_classes,
        "class_counts": trainer.class_counts, "val_class_counts": trainer.val_class_counts,
        "device": str(trainer.device)}))
    server = _Server(trainer, control_conn)
    while not server.closed:
        ready = wait([train_conn, control_conn])
        if control_conn in ready:
            server.serve_one()
            continue
        try:
            (steps,) = _receive_message(train_conn)
        except EOFError:
            return
        try:
            reply: Any = ("ok", trainer.train_steps(steps, between=server.serve_pending))
        except _Closed:
            return
        except Exception as exc:
            reply = _error_reply(exc)
        _send(train_conn, reply)


class TrainerProcess:
    """A :class:`~p2pnode.trainer.LocalTrainer` in a child process, behind the same methods.

    Construct it on the thread that should outlive the child (the main thread: the child is told to die
    with the thread that started it), then call :meth:`wait_ready` (it blocks while the child builds its
    trainer; a worker thread is fine). :meth:`close` ends the child. Every method may be called from any
    thread; calls on the control pipe are served one at a time, between two training steps while a
    :meth:`train_steps` call runs (evaluations in a thread of the child, beside the training).

    Parameters
    ----------
    config
        The node's configuration: the child builds its trainer from it.
    model
        A CPU copy of the task's model for this seed; only its structure is read (layer layout and the
        architecture fingerprint), its weights are never updated.
    """

    def __init__(self, config: NodeConfig, model: nn.Module) -> None:
        train_ends, control_ends = socket.socketpair(), socket.socketpair()
        child_fds = (train_ends[1].fileno(), control_ends[1].fileno())
        env = dict(os.environ)  # the child imports this p2pnode, installed or not
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "p2pnode.train_process", *map(str, child_fds)],
                pass_fds=child_fds, stdin=subprocess.DEVNULL, env=env)
        finally:
            train_ends[1].close()
            control_ends[1].close()
        self._train_conn = Connection(train_ends[0].detach())
        self._control_conn = Connection(control_ends[0].detach())
        _send(self._control_conn, (_config_layout(config),))
        self._train_lock, self._control_lock = threading.Lock(), threading.Lock()
        self.model = model
        self.num_params = sum(math.prod(shape) for _, shape in model_spec(model))
        self.num_classes = 0
        self.class_counts = self.val_class_counts = torch.zeros(0, dtype=torch.int64)
        self.device = torch.device("cpu")

    @property
    def pid(self) -> int:
        """The training process's pid."""
        return self._process.pid

    def wait_ready(self) -> None:
        """Block until the child has built its trainer.

        Raises
        ------
        TaskError, ValueError, RuntimeError
            As building the trainer raised them in the child (e.g. an empty shard).
        TrainProcessError
            If the child died or raised another kind of error.
        """
        with self._control_lock:
            reply = self._receive(self._control_conn)
        if reply[0] != "ready":
            self._exited(5.0)
            self._raise(reply)
        info = reply[1]
        if info["num_params"] != self.num_params:
            self.close()
            raise TrainProcessError(f"the training process's model has {info['num_params']} parameters, "
                                    f"the node's copy {self.num_params}")
        self.num_classes = int(info["num_classes"])
        self.class_counts, self.val_class_counts = info["class_counts"], info["val_class_counts"]
        self.device = torch.device(info["device"])
        logger.info("training in process %s on %s", self.pid, self.device)

    def train_steps(self, n: int, between: Callable[[], None] | None = None) -> float:
        """``n`` SGD steps in the child; returns their mean loss (see :meth:`LocalTrainer.train_steps`)."""
        if between is not None:
            raise ValueError("a training process takes no between-steps callback")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        with self._train_lock:
            self._send(self._train_conn, (n,))
            return float(self._result(self._receive(self._train_conn)))

    def get_flat(self) -> torch.Tensor:
        """A CPU float32 copy of the flat model vector."""
        return self._call("get_flat")  # type: ignore[no-any-return]

    def set_flat_(self, flat: torch.Tensor) -> None:
        self._call("set_flat_", flat.detach().cpu())

    def add_flat_(self, delta: torch.Tensor) -> None:
        self._call("add_flat_", delta.detach().cpu())

    def reset_momentum(self) -> None:
        self._call("reset_momentum")

    def evaluate(self, max_samples: int | None = None) -> tuple[float, float]:
        accuracy, loss = self._call("evaluate", max_samples)
        return float(accuracy), float(loss)

    def class_f1(self, flat: torch.Tensor) -> torch.Tensor:
        return self._call("class_f1", flat.detach().cpu())  # type: ignore[no-any-return]

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict")  # type: ignore[no-any-return]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._call("load_state_dict", state)

    @property
    def steps_done(self) -> int:
        return int(self._call("steps_done"))

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to exit; end it (its pid only) if it has not within ``timeout`` seconds."""
        if self._process.poll() is None:
            try:
                with self._control_lock:
                    _send(self._control_conn, ("close",))
            except (OSError, ValueError):  # the pipe is already gone
                pass
            self._exited(timeout)
        if self._process.poll() is None:
            logger.warning("training process %s did not exit; terminating it", self.pid)
            self._process.terminate()
            self._exited(timeout)
        with self._train_lock:  # a training call still waiting has seen the child exit by now
            self._train_conn.close()
        with self._control_lock:
            self._control_conn.close()

    # -- plumbing ------------------------------------------------------------------------------------
    def _exited(self, timeout: float) -> bool:
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _call(self, op: str, *args: Any) -> Any:
        with self._control_lock:
            self._send(self._control_conn, (op, *args))
            return self._result(self._receive(self._control_conn))

    def _closed_pipe(self) -> TrainProcessError:
        self._exited(2.0)  # a child that closed its end is exiting: give it a moment to be reaped
        return TrainProcessError(f"the training process {self.pid} closed its pipe "
                                 f"(exit code {self._process.poll()})")

    def _send(self, conn: Connection, message: tuple[Any, ...]) -> None:
        try:
            _send(conn, message)
        except OSError as exc:  # a broken pipe: the child is gone
            raise self._closed_pipe() from exc

    def _receive(self, conn: Connection) -> Any:
        try:
            while not conn.poll(_POLL_S):
                if self._process.poll() is not None:
                    raise TrainProcessError(f"the training process {self.pid} died "
                                            f"(exit code {self._process.returncode})")
            return _receive_message(conn)
        except (EOFError, OSError) as exc:  # closed, or reset with our request unread: the child is gone
            raise self._closed_pipe() from exc

    def _result(self, reply: Any) -> Any:
        if reply[0] != "ok":
            self._raise(reply)
        return reply[1]

    @staticmethod
    def _raise(reply: Any) -> None:
        if reply[0] == "error":
            _, kind, message = reply
            if kind in _RERAISED:
                raise _RERAISED[kind](message)
            raise TrainProcessError(f"{kind}: {message}")
        raise TrainProcessError(f"unexpected reply from the training process: {reply[0]!r}")


def main(argv: list[str]) -> int:
    """``python -m p2pnode.train_process TRAIN_FD CONTROL_FD``: started by :class:`TrainerProcess` only."""
    if len(argv) != 2 or not all(a.isdigit() for a in argv):
        print("usage: python -m p2pnode.train_process TRAIN_FD CONTROL_FD (started by the node, not by hand)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s train-process %(message)s")
    _serve(Connection(int(argv[0])), Connection(int(argv[1])))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # nothing left to write: skip the interpreter's teardown, whose garbage collection of torch's objects
    # took seconds of CPU here, and a niced child on a busy machine then outlived close()'s wait
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
