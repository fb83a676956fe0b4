"""Checkpoints of the global model: one safetensors file per completed round.

A checkpoint holds the flat float32 global vector (``global``) and the strategy's state tensors
(``strategy/<name>``, e.g. FedAdam's moments), with the round number and the SHA-256 of the
global vector in the metadata. Under split training it also holds the server's part of the
adapter (``split/server``, with its own SHA-256): the global vector is then the institutions'
part, and the two are written (and restored) together. Files are written to a temporary name,
fsynced, then renamed, so a crash leaves either the previous checkpoint set or the new complete
file, never a torn one; :mod:`server.store` commits the row that names a checkpoint only after
this returns.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from fl_core.cli import UsageError

FloatVector = npt.NDArray[np.float32]
_GLOBAL = "global"
_STRATEGY = "strategy/"
_SERVER_PART = "split/server"


class CheckpointError(UsageError):
    """A checkpoint file that is missing, unreadable or fails its integrity check (the CLIs
    print it as one line)."""


@dataclass(frozen=True)
class Checkpoint:
    round_number: int
    global_vector: FloatVector
    #: float32 or float64 arrays (server optimiser moments are kept in float64).
    strategy_state: dict[str, npt.NDArray[np.floating]] = field(default_factory=dict)
    #: Split training: the server's part of the adapter (its blocks' LoRA tensors), else None.
    server_part: FloatVector | None = None


def _digest(vector: FloatVector) -> str:
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<f4").tobytes()).hexdigest()


def checkpoint_path(directory: Path, round_number: int) -> Path:
    return directory / f"round-{round_number:06d}.safetensors"


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    vector = np.ascontiguousarray(checkpoint.global_vector, dtype=np.float32)
    if vector.ndim != 1:
        raise CheckpointError(f"the global vector must be 1-D, got shape {vector.shape}")
    tensors: dict[str, npt.NDArray[np.floating]] = {_GLOBAL: vector}
    for name, value in checkpoint.strategy_state.items():
        if value.dtype not in (np.float32, np.float64):
            raise CheckpointError(f"strategy state {name!r} has dtype {value.dtype}")
        tensors[_STRATEGY + name] = np.ascontiguousarray(value)
    metadata = {"round": str(checkpoint.round_number), "global_sha256": _digest(vector)}
    if checkpoint.server_part is not None:
        part = np.ascontiguousarray(checkpoint.server_part, dtype=np.float32)
        if part.ndim != 1:
            raise CheckpointError(f"the server part must be 1-D, got shape {part.shape}")
        tensors[_SERVER_PART] = part
        metadata["server_part_sha256"] = _digest(part)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, checkpoint.round_number)
    temporary = final.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)  # make the rename itself durable
    finally:
        os.close(directory_fd)
    return final


def prune_checkpoints(directory: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` checkpoints (and their ``adapter-NNNNNN``
    directories); returns the round numbers removed. Call it only after the newest one is
    committed in the state database, so the checkpoint a restart resumes from always stays."""
    if keep < 1:
        return []
    rounds = sorted(
        int(p.stem.split("-")[1]) for p in directory.glob("round-*.safetensors") if p.is_file()
    )
    removed = rounds[:-keep]
    for number in removed:
        checkpoint_path(directory, number).unlink(missing_ok=True)
        adapter = directory / f"adapter-{number:06d}"
        if adapter.is_dir():
            shutil.rmtree(adapter)
    return removed


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from None
    if _GLOBAL not in tensors or "round" not in metadata:
        raise CheckpointError(f"{path}: not a fedsec checkpoint")
    vector = tensors[_GLOBAL].astype(np.float32, copy=False)
    if _digest(vector) != metadata.get("global_sha256"):
        raise CheckpointError(f"{path}: global vector does not match its recorded SHA-256")
    state = {
        name[len(_STRATEGY) :]: value
        for name, value in tensors.items()
        if name.startswith(_STRATEGY)
    }
    part = tensors.get(_SERVER_PART)
    if part is not None:
        part = part.astype(np.float32, copy=False)
        if _digest(part) != metadata.get("server_part_sha256"):
            raise CheckpointError(f"{path}: server part does not match its recorded SHA-256")
    return Checkpoint(int(metadata["round"]), vector, state, part)
