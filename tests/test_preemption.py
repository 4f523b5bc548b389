"""SIGTERM / SIGUSR1 save last.ckpt at an optimizer-step boundary, exit 0 and resume exactly."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from src.callbacks import preemption
from src.callbacks.preemption import Preemption
from src.cli import cli_main
from tests.conftest import ROOT
from tests.test_checkpoint_safety import fit_args, global_step


class SignalAt(pl.Callback):
    """Test helper: the process sends itself ``signal`` after micro-batch ``batch_idx``
    (on global rank ``rank`` only), as a scheduler would reach one process of a job."""

    def __init__(self, batch_idx: int, signal: str = "SIGTERM", rank: int = 0) -> None:
        self.batch_idx, self.signal, self.rank = batch_idx, signal, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.Signals[self.signal])


class HoldUntilSignalled(pl.Callback):
    """Test helper: at global step ``step`` write ``marker`` and hold the loop until a signal
    arrives, so the signal sent from outside lands at a known step (no timing race)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or self.marker.exists():
            return
        [watcher] = [c for c in trainer.callbacks if isinstance(c, Preemption)]
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while watcher.signal_received is None and time.monotonic() < deadline:
            time.sleep(0.05)


def helper(name: str, **init_args) -> list[str]:
    spec = {"class_path": f"tests.test_preemption.{name}", "init_args": init_args}
    return ["--trainer.callbacks+", json.dumps(spec)]


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


# -- without a fit ----------------------------------------------------------------------


def test_signal_names_and_slurm_job_ids(monkeypatch):
    assert Preemption().signals == [signal.SIGTERM, signal.SIGUSR1]
    assert Preemption(signals=["usr2"], requeue_signal=None).signals == [signal.SIGUSR2]
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        Preemption(signals=["SIGNOPE"])
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        Preemption(signals=["SIGKILL"])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert preemption.slurm_job_id() == "4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert preemption.slurm_job_id() == "4200_7"


def test_requeue_runs_scontrol_and_reports_failure(monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1 if len(calls) > 1 else 0, "", "denied")

    monkeypatch.setattr(preemption.subprocess, "run", fake_run)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert preemption.requeue_slurm_job() is True
    assert preemption.requeue_slurm_job() is False
    assert calls == [["scontrol", "requeue", "4242"]] * 2


def test_the_cli_adds_preemption_and_keep_last_options():
    from src.callbacks.checkpoint import RunCheckpoint

    sft = str(ROOT / "configs" / "sft.yaml")
    [watcher] = [
        c
        for c in cli_main(["--config", sft], run=False).trainer.callbacks
        if isinstance(c, Preemption)
    ]
    assert watcher.signals == [signal.SIGTERM, signal.SIGUSR1]
    assert watcher.requeue_signal == signal.SIGUSR1
    cli = cli_main(
        ["--config", sft, "--preemption.signals", "[]", "--checkpoint.keep_last", "2"], run=False
    )
    [watcher] = [c for c in cli.trainer.callbacks if isinstance(c, Preemption)]
    [checkpoint] = [c for c in cli.trainer.callbacks if isinstance(c, RunCheckpoint)]
    assert watcher.signals == [] and checkpoint.keep_last == 2


# -- in a fit ---------------------------------------------------------------------------


@pytest.fixture
def fake_slurm(monkeypatch):
    """A SLURM job as Lightning detects it (SLURMEnvironment, auto_requeue on by default);
    ``scontrol`` calls are recorded instead of run."""
    for key, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "sft",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    calls, run = [], subprocess.run

    def fake_run(cmd, **kwargs):  # patched module-wide: other commands still run
        if cmd[0] != "scontrol":
            return run(cmd, **kwargs)
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(preemption.subprocess, "run", fake_run)
    return calls


@pytest.mark.slow
def test_sigusr1_mid_accumulation_stops_at_the_step_boundary_requeues_and_resumes_exactly(
    tmp_path, micro_model_dir, fake_slurm, caplog
):
    caplog.set_level(logging.INFO)
    accumulate = ["--trainer.accumulate_grad_batches", "2"]
    cli_main(fit_args(tmp_path / "straight", micro_model_dir, 6, *accumulate))
    straight = tmp_path / "straight" / "sft" / "version_0" / "checkpoints" / "last.ckpt"

    received = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        runs = tmp_path / "preempted"
        # micro-batch 4 is the first half of step 3: the stop must wait for its second half
        with pytest.raises(SystemExit) as exit_info:
            cli_main(
                fit_args(runs, micro_model_dir, 6, *accumulate)
                + helper("SignalAt", batch_idx=4, signal="SIGUSR1")
            )
        assert exit_info.value.code == 0
        ckpts = runs / "sft" / "version_0" / "checkpoints"
        assert global_step(ckpts / "last.ckpt") == 3
        assert fake_slurm == [["scontrol", "requeue", "4242"]]
        assert "[preemption] replaces Lightning's SLURM auto-requeue" in caplog.text
        assert not list(runs.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own requeue stayed out
        assert not (runs / "sft" / "version_0" / "hf").exists()  # a preempted run is not done

        # after the fit the signal goes where it went before
        os.kill(os.getpid(), signal.SIGUSR1)
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)

    cli_main(fit_args(runs, micro_model_dir, 6, *accumulate, "--ckpt_path", "last"))
    assert global_step(ckpts / "last.ckpt") == 6
    resumed, reference = state_dict(ckpts / "last.ckpt"), state_dict(straight)
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)


def train_py(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_sigterm_to_train_py_saves_last_ckpt_exits_0_and_resume_reaches_max_steps(
    tmp_path, micro_model_dir
):
    marker = tmp_path / "at-step-2"
    args = fit_args(tmp_path, micro_model_dir, 6) + helper(
        "HoldUntilSignalled", step=2, marker=str(marker)
    )
    proc = train_py(args, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "training never reached step 2"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert "[preemption] SIGTERM at step 2: saved" in output
    assert "Traceback" not in output
    run = tmp_path / "sft" / "version_0"
    assert global_step(run / "checkpoints" / "last.ckpt") == 2
    assert not (run / "hf").exists()

    cli_main(fit_args(tmp_path, micro_model_dir, 6, "--ckpt_path", "last"))
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["version_0"]
    assert global_step(run / "checkpoints" / "last.ckpt") == 6
    assert (run / "hf" / "config.json").exists()


@pytest.mark.slow
def test_ddp_ranks_agree_to_stop_when_only_one_rank_gets_the_signal(tmp_path, micro_model_dir):
    args = fit_args(
        tmp_path,
        micro_model_dir,
        6,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ) + helper("SignalAt", batch_idx=1, signal="SIGTERM", rank=1)  # rank 1 only, after step 2
    proc = train_py(args, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)  # ranks that disagree would hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert "[preemption] a signal to another rank at step 2: saved" in output  # rank 0's log
    assert global_step(tmp_path / "sft" / "version_0" / "checkpoints" / "last.ckpt") == 2
