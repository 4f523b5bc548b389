"""Resolution of --ckpt_path: `last` finds the newest run of the experiment."""

from __future__ import annotations

import pytest

from src.cli import resolve_checkpoint


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_last_picks_the_newest_version_with_a_last_checkpoint(tmp_path):
    exp = tmp_path / "sft"
    touch(exp / "version_2" / "checkpoints" / "last.ckpt")
    touch(exp / "version_10" / "checkpoints" / "last.ckpt")
    (exp / "version_11").mkdir()  # a run that never saved
    path, version = resolve_checkpoint("last", exp)
    assert path.endswith("version_10/checkpoints/last.ckpt") and version == 10


def test_a_path_inside_the_experiment_keeps_its_version(tmp_path):
    exp = tmp_path / "sft"
    ckpt = touch(exp / "version_3" / "checkpoints" / "step=100.ckpt")
    assert resolve_checkpoint(str(ckpt), exp) == (str(ckpt), 3)
    elsewhere = touch(tmp_path / "other.ckpt")
    assert resolve_checkpoint(str(elsewhere), exp) == (str(elsewhere), None)


def test_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .*version_\\*/checkpoints/last.ckpt"):
        resolve_checkpoint("last", tmp_path / "sft")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve_checkpoint(str(tmp_path / "nope.ckpt"), tmp_path / "sft")
