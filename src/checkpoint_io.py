"""Crash-safe checkpoint files: a killed write never damages the checkpoint it replaces.

Lightning's ``TorchCheckpointIO`` opens the target with ``"wb"``, truncating the previous
``last.ckpt`` before the new bytes are in: a SIGKILL (OOM killer, scheduler, node loss) at
that moment leaves no good checkpoint at all. ``AtomicCheckpointIO`` writes a hidden
temporary file in the same directory, fsyncs it and renames it over the target.
"""

from __future__ import annotations

import os
import pickle
import re
import uuid
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info

from src.compat import (
    fsdp_saves_full_state,
    replace_wrapped_checkpoint_io,
    saves_distributed_checkpoint,
    training_loader_states,
)
from src.errors import ResumeError

# ".last.ckpt.tmp-<pid>-<hex>": hidden, and not ending in ".ckpt", so globs for checkpoints
# (``--ckpt_path last``, ``keep_last`` pruning) never see a half-written file.
TEMP_FILE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose single-file saves are atomic on a local filesystem.

    The checkpoint is written to ``.<name>.tmp-<pid>-<id>`` beside the target, flushed and
    fsynced, then ``os.replace``-d onto the final name (atomic on POSIX), so readers see the
    old file or the new one, never a torn one. Temporary files left by killed writes are
    removed after the next successful save. Remote paths (``s3://``...) use Lightning's save.
    """

    def __init__(self) -> None:
        super().__init__()
        self._in_flight: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._in_flight.add(tmp)
        try:
            with open(tmp, "wb") as file:
                self._write(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self._in_flight.discard(tmp)
        _fsync_directory(path.parent)  # make the rename itself survive a power loss
        self._remove_stale_temp_files(path.parent)

    def _write(self, checkpoint: dict[str, Any], file: IO[bytes]) -> None:
        torch.save(checkpoint, file)

    def _remove_stale_temp_files(self, directory: Path) -> None:
        for entry in directory.iterdir():
            if TEMP_FILE.match(entry.name) and entry not in self._in_flight:
                entry.unlink(missing_ok=True)
                rank_zero_info(f"[checkpoint] removed {entry.name}, left by an interrupted save")


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms where a directory cannot be opened (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A single-file checkpoint of this template's own runs, on the CPU.

    Read with the tensors-only unpickler first; a file holding objects beyond tensors (a
    run's hyperparameters, callback states) is read with the full one. ``mmap`` maps a local
    file's tensors instead of reading them (for the step and other metadata of a large file).
    """
    from lightning.fabric.utilities.cloud_io import get_filesystem

    def load(weights_only: bool) -> dict[str, Any]:
        if "://" not in str(path):
            return torch.load(str(path), map_location="cpu", weights_only=weights_only, mmap=mmap)
        with get_filesystem(str(path)).open(str(path), "rb") as file:
            return torch.load(file, map_location="cpu", weights_only=weights_only)

    try:
        return load(weights_only=True)
    except pickle.UnpicklingError:
        return load(weights_only=False)


def saves_single_file(strategy: Strategy) -> bool:
    """Whether ``strategy`` writes a checkpoint as one file through its ``CheckpointIO``.

    DeepSpeed, sharded FSDP and distributed ModelParallel checkpoints are directories written
    by the strategy itself; strategies unknown here that override ``save_checkpoint`` are left
    alone too.
    """
    if isinstance(strategy, FSDPStrategy):
        return fsdp_saves_full_state(strategy)
    if isinstance(strategy, ModelParallelStrategy):
        return not saves_distributed_checkpoint(strategy)
    return type(strategy).save_checkpoint is Strategy.save_checkpoint


def install_atomic_io(strategy: Strategy) -> bool:
    """Swap Lightning's default ``TorchCheckpointIO`` for ``AtomicCheckpointIO``.

    Only the stock IO is replaced (also inside ``AsyncCheckpointIO``): a ``CheckpointIO``
    plugin the user configured is kept as it is. Returns whether the atomic IO is in use.
    """
    if not saves_single_file(strategy):
        return False
    io = strategy.checkpoint_io
    if isinstance(io, AtomicCheckpointIO):
        return True
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    if isinstance(io, AsyncCheckpointIO) and type(io.checkpoint_io) is TorchCheckpointIO:
        replace_wrapped_checkpoint_io(io, AtomicCheckpointIO())
        return True
    return False


__all__ = ["AtomicCheckpointIO", "install_atomic_io", "read_checkpoint", "saves_single_file"]


def move_data_position(checkpoint: dict[str, Any], processes: int) -> None:
    """Translate a checkpoint's mid-epoch data position to ``processes`` data-parallel
    processes (in place; the checkpoint records how many wrote it).

    A distributed sampler deals rank ``r`` the indices ``r, r + W, r + 2W, ...`` of one
    shuffled order that does not depend on ``W``: after ``k`` samples per rank the first
    ``k * W`` are used, whatever ``W``. So ``k`` samples on each of ``W`` ranks become
    ``k * W / processes`` on each of ``processes``, the same examples in the same global
    batches. A single process without a distributed sampler draws another order: refused.
    """
    before = checkpoint.get("data_parallel_size")
    if before is None or before == processes:
        return
    for state in training_loader_states(checkpoint):
        position = state.get("_sampler_iter_state")
        if not isinstance(position, dict) or "samples_yielded" not in position:
            continue
        if "sampler_iter_state" in position:  # a single process's random sampler
            raise ResumeError(
                f"this checkpoint was written by one process without a distributed sampler, "
                f"whose mid-epoch data order {processes} processes cannot continue: resume "
                "on one process, or from a checkpoint at an epoch's end"
            )
        used = position["samples_yielded"] * before
        if used % processes:
            raise ResumeError(
                f"the checkpoint's {before} processes had used {used} examples of this "
                f"epoch, which {processes} processes cannot split evenly: resume on a "
                "number of processes that divides it, or from a checkpoint at an epoch's end"
            )
        position["samples_yielded"] = used // processes
        rank_zero_info(
            f"[resume] data position moved from {before} to {processes} processes: "
            f"{used} examples of this epoch used"
        )
