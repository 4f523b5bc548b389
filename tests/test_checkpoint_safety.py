"""Checkpoints survive a SIGKILL in the middle of a write; keep_last prunes periodic files."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from src.callbacks.checkpoint import RunCheckpoint
from src.checkpoint_io import AtomicCheckpointIO, install_atomic_io
from src.cli import cli_main, resolve_checkpoint
from tests.conftest import ROOT
from tests.test_e2e import fit_args as e2e_fit_args

STALE = ".last.ckpt.tmp-999999-deadbeef"  # what a killed write leaves behind


def fit_args(runs: Path, model_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """The end-to-end tests' short SFT fit, validated once at the end, on rows of 64."""
    return e2e_fit_args(
        runs,
        model_dir,
        max_steps,
        "--trainer.val_check_interval",
        str(max_steps),
        "--trainer.limit_val_batches",
        "1",
        "--data.init_args.max_length",
        "64",
        *extra,
    )


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


# -- the IO on its own ------------------------------------------------------------------


def test_save_replaces_the_file_and_removes_temp_files_of_killed_writes(tmp_path):
    target = tmp_path / "last.ckpt"
    torch.save({"global_step": 1}, target)
    (tmp_path / STALE).write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("not ours")

    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, target)

    assert global_step(target) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "notes.txt"]


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, target)

    def torn_write(self, checkpoint, file):
        file.write(b"\x80\x02 the first bytes")
        raise OSError("disk full")

    monkeypatch.setattr(AtomicCheckpointIO, "_write", torn_write)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 6}, target)
    assert global_step(target) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # its temp file is gone too


def test_atomic_io_replaces_only_the_default_io_of_single_file_strategies():
    single = SingleDeviceStrategy(device=torch.device("cpu"))
    assert install_atomic_io(single) and type(single.checkpoint_io) is AtomicCheckpointIO
    ddp = DDPStrategy()
    assert install_atomic_io(ddp) and type(ddp.checkpoint_io) is AtomicCheckpointIO
    full = FSDPStrategy(state_dict_type="full")
    assert install_atomic_io(full) and type(full.checkpoint_io) is AtomicCheckpointIO

    sharded = FSDPStrategy(state_dict_type="sharded")  # a directory per checkpoint
    assert not install_atomic_io(sharded) and type(sharded.checkpoint_io) is TorchCheckpointIO

    class MyIO(TorchCheckpointIO):
        pass

    own = SingleDeviceStrategy(device=torch.device("cpu"), checkpoint_io=MyIO())
    assert not install_atomic_io(own) and type(own.checkpoint_io) is MyIO


def test_ckpt_path_last_ignores_a_temp_file_left_by_a_killed_write(tmp_path):
    good = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    good.parent.mkdir(parents=True)
    torch.save({"global_step": 3}, good)
    newer = tmp_path / "version_1" / "checkpoints"
    newer.mkdir(parents=True)
    (newer / STALE).write_bytes(b"torn")  # the newer run was killed writing its first one
    assert resolve_checkpoint("last", tmp_path) == (str(good), 0)


def test_keep_last_must_be_positive_and_not_combined_with_a_monitor():
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        RunCheckpoint(keep_last=0)
    with pytest.raises(ValueError, match="cannot be combined with checkpoint.monitor"):
        RunCheckpoint(keep_last=2, monitor="val/loss")


# -- in a fit ---------------------------------------------------------------------------


@pytest.mark.slow
def test_keep_last_keeps_the_newest_k_and_deletes_only_after_the_next_is_written(
    tmp_path, micro_model_dir, monkeypatch
):
    removals = []  # (removed, the checkpoint files present at that moment)
    remove = AtomicCheckpointIO.remove_checkpoint

    def spy(self, path):
        removals.append((Path(path).name, sorted(p.name for p in Path(path).parent.iterdir())))
        remove(self, path)

    monkeypatch.setattr(AtomicCheckpointIO, "remove_checkpoint", spy)
    cli_main(
        fit_args(tmp_path, micro_model_dir, 8, "--checkpoint.every_n_train_steps", "2")
        + ["--checkpoint.keep_last", "2"]
    )
    ckpts = tmp_path / "sft" / "version_0" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=6.ckpt", "step=8.ckpt"]
    assert global_step(ckpts / "last.ckpt") == 8
    assert [name for name, _ in removals] == ["step=2.ckpt", "step=4.ckpt"]
    # step=2 went once step=6 was complete on disk (step=4 once step=8 was), last.ckpt stayed
    assert removals[0][1] == ["last.ckpt", "step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    assert removals[1][1] == ["last.ckpt", "step=4.ckpt", "step=6.ckpt", "step=8.ckpt"]


def run_fit_that_blocks_in_a_checkpoint_write(args: list[str]) -> None:
    """Driver for the SIGKILL test (run in a subprocess): train, and when ``last.ckpt`` is
    rewritten at step >= BLOCK_AT_STEP, write half of it, touch MARKER and hang there."""
    from src.checkpoint_io import AtomicCheckpointIO

    marker, block_at = Path(os.environ["MARKER"]), int(os.environ["BLOCK_AT_STEP"])
    save, write = AtomicCheckpointIO.save_checkpoint, AtomicCheckpointIO._write

    def save_noting_the_target(self, checkpoint, path, storage_options=None):
        self.target = Path(path)
        save(self, checkpoint, path, storage_options)

    def half_then_hang(self, checkpoint, file):
        if self.target.name != "last.ckpt" or checkpoint["global_step"] < block_at:
            return write(self, checkpoint, file)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        file.flush()
        os.fsync(file.fileno())
        marker.write_text(file.name)
        while True:  # killed here, deterministically inside the write
            time.sleep(1)

    AtomicCheckpointIO.save_checkpoint = save_noting_the_target
    AtomicCheckpointIO._write = half_then_hang
    cli_main(args)


@pytest.mark.slow
def test_sigkill_while_writing_last_ckpt_keeps_the_previous_one_and_resume_works(
    tmp_path, micro_model_dir
):
    args = fit_args(tmp_path, micro_model_dir, 6)
    marker = tmp_path / "inside-the-write"
    env = {**os.environ, "MARKER": str(marker), "BLOCK_AT_STEP": "6", "PYTHONPATH": str(ROOT)}
    code = (
        "import sys; from tests.test_checkpoint_safety import "
        "run_fit_that_blocks_in_a_checkpoint_write as run; run(sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the driver never reached the blocking write"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()

    ckpts = tmp_path / "sft" / "version_0" / "checkpoints"
    torn = Path(marker.read_text())
    assert torn.parent == ckpts and torn.stat().st_size > 0  # the half-written temp file
    assert global_step(ckpts / "last.ckpt") == 3  # the previous good one, untouched
    # the periodic step=6.ckpt written before it completed: `last` takes the newest checkpoint
    assert resolve_checkpoint("last", tmp_path / "sft") == (str(ckpts / "step=6.ckpt"), 0)

    cli_main(fit_args(tmp_path, micro_model_dir, 8, "--ckpt_path", "last"))
    assert global_step(ckpts / "last.ckpt") == 8
    assert not torn.exists()  # cleaned up by the first successful save
    assert not [p for p in ckpts.iterdir() if ".tmp-" in p.name]
