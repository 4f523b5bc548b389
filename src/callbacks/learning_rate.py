"""The learning rate as ``train/lr``: beside the losses in TensorBoard, not a card of its own."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class LearningRate(pl.Callback):
    """Log the learning rate each step uses as ``train/lr`` (at ``log_every_n_steps``, like
    ``train/loss``). Parameter groups with a learning rate of their own (other than the first
    group's) are logged as ``train/lr/group_<i>`` too."""

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.optimizers:
            return
        groups = trainer.optimizers[0].param_groups
        rates = [float(g["lr"]) for g in groups]
        log = {"on_step": True, "on_epoch": False, "batch_size": 1, "sync_dist": False}
        pl_module.log("train/lr", rates[0], **log)
        for i, rate in enumerate(rates[1:], start=1):
            if rate != rates[0]:
                pl_module.log(f"train/lr/group_{i}", rate, **log)
