"""The run directory, read on rank 0 without a collective."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_dir(trainer: pl.Trainer) -> str | None:
    """What ``trainer.log_dir`` returns, minus its broadcast (``trainer.log_dir`` is a
    collective under DDP, so calling it from rank 0 alone hangs the run), and with the
    TensorBoard (else CSV) logger's directory wherever it is in the list of loggers."""
    if not trainer.loggers:
        return trainer.default_root_dir
    for kind in (TensorBoardLogger, CSVLogger):
        for logger in trainer.loggers:
            if isinstance(logger, kind):
                return logger.log_dir
    return trainer.loggers[0].save_dir
