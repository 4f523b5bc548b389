"""SIGTERM / SIGUSR1 / Ctrl-C save last.ckpt at an optimizer-step boundary, exit 0 and resume
exactly; a second Ctrl-C stops at once."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
    arrives, so the signal sent from outside lands at a known step (no timing race). Then
    write ``<marker>.signalled`` and hold ``then_hold_s`` seconds more, for a second signal
    to land while the first one is pending."""

    def __init__(self, step: int, marker: str, then_hold_s: float = 0.0) -> None:
        self.step, self.marker, self.then_hold_s = step, Path(marker), then_hold_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or self.marker.exists():
            return
        [watcher] = [c for c in trainer.callbacks if isinstance(c, Preemption)]
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while watcher.signal_received is None and time.monotonic() < deadline:
            time.sleep(0.05)
        signalled(self.marker).write_text(str(watcher.signal_received))
        time.sleep(self.then_hold_s)


def signalled(marker: Path) -> Path:
    return marker.with_name(marker.name + ".signalled")


def helper(name: str, **init_args) -> list[str]:
    spec = {"class_path": f"tests.test_preemption.{name}", "init_args": init_args}
    return ["--trainer.callbacks+", json.dumps(spec)]


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


# -- without a fit ----------------------------------------------------------------------


def test_signal_names_and_slurm_job_ids(monkeypatch):
    assert Preemption().signals == [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
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
    assert watcher.signals == [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
    assert watcher.requeue_signal == signal.SIGUSR1
    cli = cli_main(
        ["--config", sft, "--preemption.signals", "[]", "--checkpoint.keep_last", "2"], run=False
    )
    [watcher] = [c for c in cli.trainer.callbacks if isinstance(c, Preemption)]
    [checkpoint] = [c for c in cli.trainer.callbacks if isinstance(c, RunCheckpoint)]
    assert watcher.signals == [] and checkpoint.keep_last == 2


def test_resume_and_export_commands_are_this_command_line_with_the_checkpoint():
    ckpt = "runs/sft/version_0/checkpoints/last.ckpt"
    argv = ["train.py", "fit", "--config", "configs/sft.yaml", "--ckpt_path", "last"]
    expected = f"python train.py fit --config configs/sft.yaml --ckpt_path {ckpt}"
    assert preemption.resume_command(ckpt, argv) == expected
    argv = ["train.py", "fit", "--ckpt_path=runs/x.ckpt", "--model.init_args.lr", "1e-4 "]
    assert preemption.resume_command("my runs/last.ckpt", argv) == (
        "python train.py fit --model.init_args.lr '1e-4 ' --ckpt_path 'my runs/last.ckpt'"
    )
    assert preemption.resume_command(ckpt, ["pytest", "-q"]) is None  # a fit from Python
    assert preemption.export_command(ckpt, ["train.py"]) == f"python scripts/export.py {ckpt}"
    export = ROOT / "scripts" / "export.py"
    assert preemption.export_command(ckpt, [str(ROOT / "train.py")]) == f"python {export} {ckpt}"


@pytest.fixture
def sigint_raises():
    """SIGINT as in a fresh interpreter (KeyboardInterrupt), whatever pytest set; all the
    handlers put back afterwards."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield before
    for signum, handler in before.items():
        signal.signal(signum, handler)


def ctrl_c_interrupts() -> bool:
    """Send this process a SIGINT: whether it raised KeyboardInterrupt (caught here, as
    pytest would stop the whole session on it)."""
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        return True
    return False


def armed(watcher: Preemption) -> Preemption:
    watcher._armed = True  # as setup does, without a trainer
    watcher._install()
    return watcher


def test_ctrl_c_once_is_recorded_twice_interrupts_and_a_third_is_not_ours(capfd, sigint_raises):
    watcher = armed(Preemption())
    assert not ctrl_c_interrupts()
    assert watcher.signal_received == signal.SIGINT
    assert capfd.readouterr().err == preemption.CTRL_C_NOTICE
    assert "press Ctrl-C again to stop at once" in preemption.CTRL_C_NOTICE

    assert ctrl_c_interrupts()
    assert capfd.readouterr().err == preemption.CTRL_C_AGAIN_NOTICE
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert ctrl_c_interrupts()  # the handler from before, once: no loop

    # Lightning's teardown puts ours back after the fit: it steps aside to the one before
    signal.signal(signal.SIGINT, watcher._handle)
    assert ctrl_c_interrupts()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_after_another_stop_signal_interrupts_and_sigint_can_be_left_out(
    capfd, sigint_raises
):
    watcher = armed(Preemption())
    signal.raise_signal(signal.SIGTERM)
    assert ctrl_c_interrupts()  # a stop is pending: Ctrl-C means now
    assert "press Ctrl-C again" not in capfd.readouterr().err
    watcher._restore()
    assert signal.getsignal(signal.SIGTERM) == sigint_raises[signal.SIGTERM]

    watcher = armed(Preemption(signals=["SIGTERM"]))
    watcher._restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # never ours


def test_ctrl_c_in_a_forked_worker_or_ignored_from_the_start_is_left_alone(capfd, sigint_raises):
    watcher = armed(Preemption())
    watcher._pid = -1  # as in a data-loader worker forked from the training process
    assert not ctrl_c_interrupts()
    assert not ctrl_c_interrupts()  # not even a second one: the worker keeps serving
    assert watcher.signal_received is None and capfd.readouterr().err == ""
    watcher._restore()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a script
    watcher = armed(Preemption())
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    watcher._restore()


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


@contextlib.contextmanager
def train_py(args: list[str]) -> Iterator[subprocess.Popen]:
    """``python train.py ARGS`` in a session of its own (its process group, as a terminal's
    foreground job), output and errors together; killed with its children if left running."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # as at a terminal: Ctrl-C not ignored, though this test may run as a background job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"training never wrote {path.name}"
        time.sleep(0.1)


def stopped_at_step_2(
    tmp_path: Path, model_dir: Path, send: Callable[[int], None], *extra: str
) -> tuple[str, Path]:
    """``train.py`` held at step 2, ``send`` given its pid there, checked to have saved
    ``last.ckpt`` at step 2 and exited 0; its output and run directory."""
    args, marker = held_at_step_2(tmp_path, model_dir, *extra)
    with train_py(args) as proc:
        wait_for(marker, proc)
        send(proc.pid)
        output, _ = proc.communicate(timeout=120)
    run = tmp_path / "sft" / "version_0"
    assert_stopped_at_step_2_with_last_ckpt(proc.returncode, output, run)
    return output, run


def held_at_step_2(tmp_path: Path, model_dir: Path, *extra: str, then_hold_s: float = 0.0):
    """The end-to-end fit to step 6, held at step 2 until a signal; and the hold's marker."""
    marker = tmp_path / "at-step-2"
    hold = helper("HoldUntilSignalled", step=2, marker=str(marker), then_hold_s=then_hold_s)
    return fit_args(tmp_path, model_dir, 6, *extra) + hold, marker


def assert_stopped_at_step_2_with_last_ckpt(returncode: int, output: str, run: Path) -> None:
    assert returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert global_step(run / "checkpoints" / "last.ckpt") == 2
    assert not (run / "hf").exists()


def assert_resumed_to_step_6(runs: Path) -> None:
    run = runs / "sft" / "version_0"
    assert sorted(p.name for p in (runs / "sft").iterdir()) == ["version_0"]
    assert global_step(run / "checkpoints" / "last.ckpt") == 6
    assert (run / "hf" / "config.json").exists()


@pytest.mark.slow
def test_sigterm_to_train_py_saves_last_ckpt_exits_0_and_resume_reaches_max_steps(
    tmp_path, micro_model_dir
):
    output, _ = stopped_at_step_2(
        tmp_path, micro_model_dir, lambda pid: os.kill(pid, signal.SIGTERM)
    )
    assert "[preemption] SIGTERM at step 2: saved" in output

    cli_main(fit_args(tmp_path, micro_model_dir, 6, "--ckpt_path", "last"))
    assert_resumed_to_step_6(tmp_path)


@pytest.mark.slow
def test_ctrl_c_to_train_py_saves_last_ckpt_exits_0_and_the_printed_command_resumes(
    tmp_path, micro_model_dir
):
    # Ctrl-C at a terminal reaches the whole foreground process group: data-loader workers too
    output, run = stopped_at_step_2(
        tmp_path,
        micro_model_dir,
        lambda pid: os.killpg(pid, signal.SIGINT),
        "--data.init_args.num_workers",
        "1",
    )
    last = run / "checkpoints" / "last.ckpt"
    assert preemption.CTRL_C_NOTICE in output
    assert f"[preemption] SIGINT at step 2: saved {last}; stopping" in output
    export = ROOT / "scripts" / "export.py"
    assert f"[preemption] export these weights with:  python {export} {last}\n" in output

    [resume] = [
        line.split("[preemption] resume with:  ", 1)[1]
        for line in output.splitlines()
        if "[preemption] resume with:  " in line
    ]
    command = shlex.split(resume)
    assert command[:2] == ["python", str(ROOT / "train.py")]
    assert command[-2:] == ["--ckpt_path", str(last)] and command.count("--ckpt_path") == 1
    cli_main(command[2:])  # the printed arguments, in process, through what train.py calls
    assert_resumed_to_step_6(tmp_path)


@pytest.mark.slow
def test_a_second_ctrl_c_to_train_py_stops_at_once_without_saving(tmp_path, micro_model_dir):
    args, marker = held_at_step_2(tmp_path, micro_model_dir, then_hold_s=120)
    with train_py(args) as proc:
        wait_for(marker, proc)
        os.killpg(proc.pid, signal.SIGINT)
        wait_for(signalled(marker), proc, timeout=30)  # the first one is pending
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30  # not held to the end of the 120 s
    assert proc.returncode != 0, output[-3000:]
    assert preemption.CTRL_C_NOTICE in output and preemption.CTRL_C_AGAIN_NOTICE in output
    assert "Detected KeyboardInterrupt" in output  # Lightning's own interrupt handling
    assert "[preemption] SIGINT at step" not in output
    # checkpoints every 3 steps: none at step 2, and none written for the stop
    assert not list((tmp_path / "sft" / "version_0").rglob("*.ckpt"))


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
    with train_py(args) as proc:
        output, _ = proc.communicate(timeout=300)  # ranks that disagree would hang
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert "[preemption] a signal to another rank at step 2: saved" in output  # rank 0's log
    assert global_step(tmp_path / "sft" / "version_0" / "checkpoints" / "last.ckpt") == 2
