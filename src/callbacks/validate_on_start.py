"""A validation pass before the first training step: the untrained baseline at step 0."""

from __future__ import annotations

import lightning.pytorch as pl


class ValidateOnStart(pl.Callback):
    """Run the validation loop once when a fresh fit starts (not when it resumes).

    The step-0 point of ``val/loss`` (and the samples of an untrained model) make the learning
    curve start where training starts.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 or not trainer.enable_validation:
            return
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
