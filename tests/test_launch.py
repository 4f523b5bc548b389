"""The launch scripts: torchrun (run for real on 2 CPU processes) and the SLURM batch file."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.conftest import ROOT
from tests.test_e2e import scalars

LAUNCH = ROOT / "scripts" / "launch"


def test_sbatch_passes_nodes_devices_and_resumes_after_a_requeue(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    srun = fake / "srun"
    srun.write_text('#!/bin/sh\necho "$@"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_NTASKS_PER_NODE": "8",
    }

    def command(restarts: int) -> list[str]:
        result = subprocess.run(
            ["bash", str(LAUNCH / "slurm.sbatch"), "--config", "configs/sft.yaml"],
            env={**env, "SLURM_RESTART_COUNT": str(restarts)},
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.split()

    first, requeued = command(0), command(1)
    assert first[1:] == [
        "train.py",
        "fit",
        "--config",
        "configs/sft.yaml",
        "--trainer.num_nodes",
        "4",
        "--trainer.devices",
        "8",
    ]
    assert requeued[1:] == [*first[1:], "--ckpt_path", "last"]
    header = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@120" in header and "#SBATCH --requeue" in header


@pytest.mark.slow
def test_torchrun_launches_two_processes_with_the_same_configs(tmp_path, micro_model_dir):
    env = {**os.environ, "GPUS_PER_NODE": "2", "MASTER_PORT": "29531"}
    result = subprocess.run(
        [
            "bash",
            str(LAUNCH / "torchrun.sh"),
            "--config",
            "configs/sft.yaml",
            "--trainer.accelerator",
            "cpu",
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.callbacks",
            "[]",
            "--model.init_args.model_name_or_path",
            str(micro_model_dir),
            "--data.init_args.batch_size",
            "2",
            "--data.init_args.cache_dir",
            str(tmp_path / "cache"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size=2" in result.stderr or "MEMBER: 2/2" in result.stderr
    run = tmp_path / "runs" / "sft" / "version_0"
    assert [s for s, _ in scalars(run, "train/loss")] == [0, 1]
    assert (run / "checkpoints" / "last.ckpt").exists()
