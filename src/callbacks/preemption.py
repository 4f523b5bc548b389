"""Graceful stop: on SIGTERM / SIGUSR1 / Ctrl-C, save ``last.ckpt`` at a step boundary, exit 0.

Clusters announce the end of a job with a signal: SLURM sends SIGTERM on preemption or at
the time limit (and the signal of ``#SBATCH --signal=USR1@90`` ahead of it), Kubernetes and
Docker send SIGTERM; at a terminal the user presses Ctrl-C (SIGINT). The handler only
records the signal; the training loop acts on it at the next optimizer-step boundary (never
inside gradient accumulation, so a resume with ``--ckpt_path last`` is exact): it writes
``last.ckpt``, requeues the SLURM job for the requeue signal, prints the command that
resumes the run and leaves with exit status 0. A second Ctrl-C before that stops at once
(``KeyboardInterrupt``, Lightning's own handling, exit status 1) without saving.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.callbacks.checkpoint import RunCheckpoint
from src.compat import cluster_environment


class Preempted(SIGTERMException):
    """Raised after the checkpoint is written: Lightning tears down and the process exits 0."""

    def __init__(self, signum: int) -> None:
        super().__init__(0)  # SystemExit(0): exit status 0, no traceback
        self.signum = signum


class Preemption(pl.Callback):
    """Save ``last.ckpt`` and stop cleanly when the process is told to go away.

    After the save, global rank 0 logs the command that resumes the run (``python`` and this
    process's command line with ``--ckpt_path <last.ckpt>``) and the one that exports the
    saved weights (``python scripts/export.py <last.ckpt>``).

    Ctrl-C (SIGINT) is one of the signals: the first one is acted on like SIGTERM (and says
    so on stderr at once); another one while that stop is pending raises
    ``KeyboardInterrupt`` on the spot, handed to Lightning's interrupt handling (exit status
    1, nothing saved). A process started with SIGINT ignored (a script's background job)
    keeps ignoring it. Data-loader workers forked from training inherit the handler and leave
    the signal to the training process, so a Ctrl-C to the whole process group does not take
    them down.

    Under DDP the decision is reduced across ranks at every optimizer step, so a signal
    that reaches any one rank stops all of them at the same step. This replaces Lightning's
    own handling: its SIGTERM handler (which stops after any batch, inside gradient
    accumulation, without a checkpoint) is switched out during training, and its SLURM
    auto-requeue (``SLURMEnvironment.auto_requeue``, which saves an ``hpc_ckpt`` instead)
    is turned off.

    Args:
        signals: Signal names that stop training (default SIGTERM, SIGUSR1, SIGINT; without
            SIGINT, Ctrl-C is left to Lightning: it stops at once, without saving). An empty
            list turns this callback off.
        requeue_signal: One of ``signals``: under SLURM (``SLURM_JOB_ID`` set), after it
            global rank 0 runs ``scontrol requeue <job>`` once ``last.ckpt`` is written.
            None: never requeue.

    A signal that arrives during a validation run is acted on at the first optimizer step
    after it.
    """

    def __init__(
        self, signals: list[str] | None = None, requeue_signal: str | None = "SIGUSR1"
    ) -> None:
        names = ["SIGTERM", "SIGUSR1", "SIGINT"] if signals is None else list(signals)
        self.signals = [_signal(name) for name in names]
        self.requeue_signal = _signal(requeue_signal) if requeue_signal else None
        self._received: int | None = None
        self._armed = False
        self._previous: dict[int, Any] = {}  # the handlers found before ours, kept for good
        self._step_at_batch_start = -1
        self._pid = os.getpid()  # the training process, set again at each install
        self._tell_user = True  # global rank 0: writes the Ctrl-C notice

    @property
    def signal_received(self) -> int | None:
        """The signal this process got during the current fit, if any (acted on or not yet)."""
        return self._received

    # -- handlers ---------------------------------------------------------------------------

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("preemption: fit is not on the main thread, signals are not handled")
            return
        self._pid = os.getpid()
        for signum in self.signals:
            current = signal.getsignal(signum)
            if (
                signum == signal.SIGINT
                and current == signal.SIG_IGN
                and signum not in self._previous
            ):
                continue  # started with Ctrl-C ignored (a background job): leave it so
            if current != self._handle:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self._handle)

    def _restore(self) -> None:
        self._armed = False
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                # Only where ours is still in place: Lightning ignores SIGINT while it shuts
                # down after a KeyboardInterrupt, and that stays so.
                if signal.getsignal(signum) == self._handle:
                    signal.signal(signum, _default_if_none(previous))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:
            if os.getpid() != self._pid:
                return  # a forked data-loader worker: the training process acts on it
            if signum == signal.SIGINT and self._received is not None:
                self._interrupt_now()
            if signum == signal.SIGINT and self._tell_user:
                os.write(2, CTRL_C_NOTICE.encode())  # not print: unsafe in a signal handler
            self._received = signum  # acted on at the next optimizer-step boundary
            return
        # Lightning's teardown may reinstall this handler after the fit: step aside and
        # let the handler that was there before take the signal.
        previous = _default_if_none(self._previous.get(signum, signal.SIG_DFL))
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def _interrupt_now(self) -> None:
        """Another Ctrl-C while a stop is pending: give up the save and stop at once."""
        self._armed = False
        previous = self._previous.get(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGINT, _default_if_none(previous))  # a third Ctrl-C: not ours
        if self._tell_user:
            os.write(2, CTRL_C_AGAIN_NOTICE.encode())
        raise KeyboardInterrupt

    # -- hooks ------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.signals:
            return
        environment = cluster_environment(trainer)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            environment.auto_requeue = False  # read when Lightning registers its handlers
            rank_zero_info("[preemption] replaces Lightning's SLURM auto-requeue")
        self._received = None
        self._tell_user = trainer.is_global_zero
        self._armed = True
        self._install()  # early, so a signal during model setup is not lost

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._armed:
            return
        # Lightning registered its SIGTERM handler after setup: take the signals back.
        self._install()
        if trainer.received_sigterm and self._received is None:
            self._received = signal.SIGTERM  # seen by Lightning's handler in between
        # Nothing was trained since the start, so the newest checkpoint is this state.
        self._stop_if_signalled(trainer, save=False)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # global_step moves only when the optimizer stepped: otherwise we are inside
        # gradient accumulation and stopping here would make the resume inexact.
        if self._armed and trainer.global_step != self._step_at_batch_start:
            self._stop_if_signalled(trainer, save=True)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()

    # -- stopping ---------------------------------------------------------------------------

    def _stop_if_signalled(self, trainer: pl.Trainer, save: bool) -> None:
        strategy = trainer.strategy
        # Every rank calls this at the same steps; any rank's signal stops them all.
        if not strategy.reduce_boolean_decision(self._received is not None, all=False):
            return
        requeue = strategy.reduce_boolean_decision(
            self._received is not None and self._received == self.requeue_signal, all=False
        )
        signum = self._received or signal.SIGTERM
        name = signal.Signals(signum).name if self._received else "a signal to another rank"
        saved = _save_last(trainer) if save else None
        if saved:
            where = f"saved {saved}"
        elif save:
            where = "no RunCheckpoint, nothing saved"
        else:
            where = "no step taken since the start, nothing new to save"
        rank_zero_info(f"[preemption] {name} at step {trainer.global_step}: {where}; stopping")
        if saved:
            command = resume_command(saved) or f"the fit command with --ckpt_path {saved}"
            rank_zero_info(f"[preemption] resume with:  {command}")
            rank_zero_info(f"[preemption] export these weights with:  {export_command(saved)}")
        if requeue and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            requeue_slurm_job()
        raise Preempted(signum)


CTRL_C_NOTICE = (
    "\n[preemption] Ctrl-C: saving last.ckpt at the next step boundary; "
    "press Ctrl-C again to stop at once\n"
)
CTRL_C_AGAIN_NOTICE = "\n[preemption] Ctrl-C again: stopping at once, without saving\n"


def resume_command(ckpt_path: str, argv: Sequence[str] | None = None) -> str | None:
    """The shell command that resumes this run from ``ckpt_path``.

    ``python`` and the command line that started the process (``sys.argv``, shell-quoted),
    any ``--ckpt_path X`` / ``--ckpt_path=X`` in it replaced by ``--ckpt_path <ckpt_path>``.
    None where that command line is no ``fit`` (a fit started from Python).
    """
    argv = list(sys.argv if argv is None else argv)
    if "fit" not in argv[1:]:
        return None
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--ckpt_path":
            skip_value = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["python", *kept, "--ckpt_path", ckpt_path])


def export_command(ckpt_path: str, argv: Sequence[str] | None = None) -> str:
    """The shell command that exports the weights in ``ckpt_path`` as a Hugging Face model:
    ``scripts/export.py`` beside the training script where it is there."""
    script = Path((sys.argv if argv is None else argv)[0]).parent / "scripts" / "export.py"
    return shlex.join(
        ["python", str(script) if script.is_file() else "scripts/export.py", ckpt_path]
    )


def _save_last(trainer: pl.Trainer) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, RunCheckpoint):
            return callback.save_last_now(trainer)
    return None


def slurm_job_id() -> str:
    """The id ``scontrol`` knows this job by (``<array job>_<task>`` for array jobs)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue_slurm_job() -> bool:
    """Put this SLURM job back in the queue; returns whether ``scontrol`` succeeded."""
    job = slurm_job_id()
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        rank_zero_warn(f"[preemption] scontrol not found: job {job} not requeued")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"[preemption] scontrol requeue {job} failed: {result.stderr.strip()}")
        return False
    rank_zero_info(f"[preemption] requeued SLURM job {job}")
    return True


def _signal(name: str) -> int:
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    try:
        signum = signal.Signals[key]
    except KeyError:
        raise ValueError(f"preemption: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)") from None
    if signum in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"preemption: {key} cannot be caught by a process")
    return int(signum)


def _default_if_none(handler: Any) -> Any:
    # signal.getsignal gives None for handlers not installed from Python
    return signal.SIG_DFL if handler is None else handler


__all__ = [
    "Preempted",
    "Preemption",
    "export_command",
    "requeue_slurm_job",
    "resume_command",
    "slurm_job_id",
]
