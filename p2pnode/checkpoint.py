"""Checkpoints of one node: ``DIR/checkpoint.pt``, written atomically (temp file, fsync, rename, fsync dir).

A checkpoint holds the trainer's state (model, optimizer, sampler, step count), the round counter, the
node's mode and peer id. It is loaded with ``torch.load(weights_only=True)``: a checkpoint file is data,
never code. A node started with ``--checkpoint-dir`` holding one resumes from it (``--mode gossip``).
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path
from typing import Any

import torch

from p2pnode.errors import P2PNodeError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
_write_ids = itertools.count()


class CheckpointError(P2PNodeError):
    """A checkpoint file exists but cannot be used."""


def checkpoint_path(directory: str | Path) -> Path:
    return Path(directory) / CHECKPOINT_NAME


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format version) to ``DIR/checkpoint.pt`` atomically; return the path."""
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per write: two writers (two threads, or two processes sharing the directory) never share a
    # temp file, so neither renames or truncates the other's half-written one
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{next(_write_ids)}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT_VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)
    return path


def remove_partial_writes(directory: str | Path) -> int:
    """Delete temp files of checkpoint writes that a crash interrupted; return how many there were."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    partial = list(directory.glob(f".{CHECKPOINT_NAME}.*.tmp"))
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``directory``, or None when there is none; CheckpointError when it is unusable."""
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or foreign file: all one error to the user
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a p2pnode checkpoint of format {FORMAT_VERSION}")
    return state
