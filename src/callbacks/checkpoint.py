"""Checkpointing: ``last.ckpt`` at the final step, atomic writes, pruning of periodic files."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from src.checkpoint_io import install_atomic_io


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is brought up to date when training ends.

    Lightning's own only refreshes it at a periodic save, so a fit whose ``max_steps`` is not
    a multiple of ``every_n_train_steps`` would leave ``last.ckpt`` behind the final step.

    Files are written atomically (``src.checkpoint_io.AtomicCheckpointIO``, installed in
    place of Lightning's default IO for strategies that save single files).

    Args:
        keep_last: Keep only the newest ``keep_last`` periodic checkpoints (``step=K.ckpt``),
            deleting older ones once a new one is completely written. ``last.ckpt`` is never
            pruned. None keeps them all.
        **kwargs: ``ModelCheckpoint`` arguments.
    """

    def __init__(self, keep_last: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be at least 1 or null, got {keep_last}")
        if keep_last is not None and self.monitor is not None:
            raise ValueError(
                "checkpoint.keep_last prunes by recency and cannot be combined with "
                f"checkpoint.monitor={self.monitor!r}: use checkpoint.save_top_k instead"
            )
        self.keep_last = keep_last

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        install_atomic_io(trainer.strategy)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
        else:
            super().on_train_end(trainer, pl_module)

    def save_last_now(self, trainer: pl.Trainer) -> str:
        """Write ``last.ckpt`` for the current step, whatever ``save_last`` says (preemption).

        Returns the path written.
        """
        candidates = self._monitor_candidates(trainer)
        if self.save_last is True:
            self._save_last_checkpoint(trainer, candidates)
            return self.last_model_path
        # save_last False or "link": a real file, not a link to an older periodic checkpoint
        path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
        self._save_checkpoint(trainer, path)
        return path

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        # The save above has returned, so the new file is complete before older ones go.
        if self.keep_last is not None and trainer.is_global_zero:
            for path in self._periodic_checkpoints(trainer)[: -self.keep_last]:
                trainer.strategy.remove_checkpoint(path)

    def _periodic_checkpoints(self, trainer: pl.Trainer) -> list[str]:
        """This callback's periodic checkpoints on disk, oldest first.

        Matched by the ``filename`` template (``step={step}`` gives ``step=*.ckpt``), without
        ``last*.ckpt`` and the checkpoint the fit resumed from (as Lightning's top-k does).
        Only files already at their final name count, so an unfinished write never does.
        """
        if self.dirpath is None or not Path(self.dirpath).is_dir():
            if self.dirpath is not None and "://" in str(self.dirpath):
                rank_zero_warn("checkpoint.keep_last: pruning works on local directories only")
            return []
        template = self.filename or "{epoch}-{step}"
        literal = re.split(r"\{[^}]*\}", template)
        pattern = re.compile(
            ".*?".join(map(re.escape, literal)) + r"(-v\d+)?" + re.escape(self.FILE_EXTENSION)
        )
        last = re.compile(re.escape(self.CHECKPOINT_NAME_LAST) + r"(-v\d+)?\.")
        resumed = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
        found = [
            entry
            for entry in Path(self.dirpath).iterdir()
            if pattern.fullmatch(entry.name)
            and not last.match(entry.name)
            and entry.resolve() != resumed
        ]
        found.sort(key=lambda p: (os.stat(p).st_mtime_ns, _natural_key(p.name)))
        return [str(p) for p in found]


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
