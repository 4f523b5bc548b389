"""Progress bars that count optimizer steps in a run bounded by ``max_steps``.

Lightning's bars describe the training bar as ``Epoch 3/-2`` when ``max_epochs`` is -1 (what
``max_steps`` alone sets): these say ``step 150/400 (epoch 3)``, the bar itself still counting
the epoch's batches. With ``max_epochs`` set they read as Lightning's. ``src.cli`` adds
``default_progress_bar()`` to every run whose config names no progress bar of its own.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from src.compat import lightning_has_rich


def step_description(trainer: pl.Trainer) -> str | None:
    """``step N/M (epoch E)`` for a run bounded by steps only, else None."""
    if not trainer.max_steps or trainer.max_steps < 0 or trainer.max_epochs not in (None, -1):
        return None
    return f"step {trainer.global_step}/{trainer.max_steps} (epoch {trainer.current_epoch})"


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich bar (its default when ``rich`` is installed), counting steps."""

    # a private hook of RichProgressBar: checked by src.compat.PRIVATE_HOOKS
    def _get_train_description(self, current_epoch: int) -> str:
        description = step_description(self.trainer)
        if description is None:
            return super()._get_train_description(current_epoch)
        return f"{description:{len(self.validation_description)}}"  # no flicker, as Lightning's

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        if self.progress is None or self.train_progress_bar_id is None or self.is_disabled:
            return
        if step_description(trainer) is not None:
            text = self._get_train_description(trainer.current_epoch)
            style = self.theme.description
            self.progress.update(
                self.train_progress_bar_id, description=f"[{style}]{text}" if style else text
            )

    @property
    def train_bar_text(self) -> str:
        """The training bar's description as shown (without its style)."""
        if self.progress is None or self.train_progress_bar_id is None:
            return ""
        text = self.progress.tasks[self.train_progress_bar_id].description
        style = self.theme.description
        return (text.removeprefix(f"[{style}]") if style else text).rstrip()


class StepTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (its default without ``rich``), counting steps."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._describe(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        self._describe(trainer)

    def _describe(self, trainer: pl.Trainer) -> None:
        description = step_description(trainer)
        if description is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_description(description, refresh=False)

    @property
    def train_bar_text(self) -> str:
        """The training bar's description as shown."""
        return (self.train_progress_bar.desc or "").removesuffix(": ")


def default_progress_bar() -> ProgressBar:
    """The bar Lightning would pick (rich where installed, else tqdm), counting steps."""
    return StepRichProgressBar() if lightning_has_rich() else StepTQDMProgressBar()


__all__ = ["StepRichProgressBar", "StepTQDMProgressBar", "default_progress_bar", "step_description"]
