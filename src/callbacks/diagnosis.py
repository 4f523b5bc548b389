"""The diagnosis of a run's curves at the end of fit: terminal, ``diagnosis.md``, TensorBoard."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from src.callbacks.divergence import DivergenceError
from src.callbacks.run_dir import run_dir
from src.diagnose import DiagnosisError, diagnose_run
from src.loggers import log_text

DIAGNOSIS_TAG = "run/diagnosis"


class Diagnosis(pl.Callback):
    """Say what the run's curves show when the fit ends (``src.diagnose``).

    On global rank 0, once the fit is over (and when it was stopped by a divergence or by
    Ctrl-C, whose curves say most), the loggers are flushed and the run directory's curves
    are read back: the diagnosis is printed, written to ``diagnosis.md`` in the run and logged
    as TensorBoard text (``run/diagnosis``). Nothing it does can fail the run: a problem is a
    warning. ``python -m src.diagnose RUN_DIR`` gives the same diagnosis later.

    Args:
        echo: Print the diagnosis.
    """

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._diagnose(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, DivergenceError):
            self._diagnose(trainer, f"{exception.reason} at optimizer step {exception.step}")
        elif isinstance(exception, KeyboardInterrupt):
            self._diagnose(trainer)

    def _diagnose(self, trainer: pl.Trainer, stopped: str | None = None) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        try:
            self._write(trainer, stopped)
        except Exception as err:  # noqa: BLE001 - a diagnosis is never worth a finished run
            rank_zero_warn(f"[diagnosis] no diagnosis of this run: {err}")

    def _write(self, trainer: pl.Trainer, stopped: str | None) -> None:
        directory = run_dir(trainer)
        if directory is None or "://" in str(directory):
            rank_zero_warn(f"[diagnosis] reads local run directories only, not {directory}")
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.flush()  # the last steps' scalars, before they are read
        try:
            markdown, _ = diagnose_run(Path(directory), write=True, stopped=stopped)
        except DiagnosisError as err:
            rank_zero_warn(f"[diagnosis] {err}")
            return
        if self.echo:
            print(f"\n{markdown}", flush=True)
        log_text(trainer, DIAGNOSIS_TAG, markdown, trainer.global_step)
