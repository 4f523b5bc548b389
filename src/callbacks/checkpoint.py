"""Checkpointing that always leaves ``last.ckpt`` at the final step of a fit."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is brought up to date when training ends.

    Lightning's own only refreshes it at a periodic save, so a fit whose ``max_steps`` is not
    a multiple of ``every_n_train_steps`` would leave ``last.ckpt`` behind the final step.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
        else:
            super().on_train_end(trainer, pl_module)
