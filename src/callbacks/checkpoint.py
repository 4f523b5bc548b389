"""Checkpointing: ``last.ckpt`` at the final step, atomic writes, pruning of periodic files;
the best checkpoints by ``val/loss`` and early stopping on it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

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
        enable_version_counter: Off: a file of the same name is replaced, never kept beside
            a ``last-v1.ckpt`` that ``--ckpt_path last`` could mistake for the older one.
        **kwargs: ``ModelCheckpoint`` arguments.
    """

    def __init__(
        self, keep_last: int | None = None, enable_version_counter: bool = False, **kwargs: Any
    ) -> None:
        # no last-v1.ckpt beside last.ckpt: a run has one newest checkpoint, under one name
        super().__init__(enable_version_counter=enable_version_counter, **kwargs)
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

    # ModelCheckpoint's private members used here and in save_last_now: checked by
    # src.compat.PRIVATE_HOOKS
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

    # a private hook of ModelCheckpoint: checked by src.compat.PRIVATE_HOOKS
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


class BestCheckpoint(ModelCheckpoint):
    """The ``save_top_k`` checkpoints with the best ``monitor`` value: off until asked for.

    Checked after every validation (the untrained step-0 baseline is never saved); the files,
    ``best-step=K-val_loss=X.XXXX.ckpt`` beside ``last.ckpt``, are whole checkpoints (resume
    or export them like any other) and are written atomically. A file that drops out of the
    top k is deleted.

    Args:
        save_top_k: How many to keep: 0 (the default) keeps none (1 with ``export``), -1 all.
        monitor: The logged metric they are ranked by.
        mode: ``min`` (a loss) or ``max`` (an accuracy).
        filename: File name template; by default ``best-step={step}-<monitor>={<monitor>:.4f}``
            (``/`` in the metric's name becomes ``_``).
        export: Export this run's best checkpoint to ``hf/`` at the end of fit, instead of the
            final weights (the ``HFExport`` callback does it; see its ``checkpoint``).
        **kwargs: ``ModelCheckpoint`` arguments.
    """

    def __init__(
        self,
        save_top_k: int = 0,
        monitor: str = "val/loss",
        mode: str = "min",
        filename: str | None = None,
        export: bool = False,
        auto_insert_metric_name: bool = False,
        save_on_train_epoch_end: bool | None = False,
        **kwargs: Any,
    ) -> None:
        if export and save_top_k == 0:
            save_top_k = 1  # exporting the best means keeping it
        if filename is None:
            filename = f"best-step={{step}}-{monitor.replace('/', '_')}={{{monitor}:.4f}}"
        super().__init__(
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            filename=filename,
            auto_insert_metric_name=auto_insert_metric_name,
            save_on_train_epoch_end=save_on_train_epoch_end,
            **kwargs,
        )
        self.export = export

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        install_atomic_io(trainer.strategy)


class EarlyStop(EarlyStopping):
    """Stop a fit once ``monitor`` has not improved for ``patience`` validations in a row.

    Off while ``patience`` is None (the default). Checked after every validation, the step-0
    baseline included; the fit then ends as usual (``last.ckpt``, ``hf/``), and says why and at
    which step. Its state is in the checkpoints, so a resumed fit keeps counting.

    Args:
        patience: Validations without improvement before stopping; None: never stop.
        monitor: The logged metric.
        mode: ``min`` (a loss) or ``max`` (an accuracy).
        min_delta: The least change that counts as an improvement.
        **kwargs: ``EarlyStopping`` arguments.
    """

    def __init__(
        self,
        patience: int | None = None,
        monitor: str = "val/loss",
        mode: str = "min",
        min_delta: float = 0.0,
        check_on_train_epoch_end: bool | None = False,
        **kwargs: Any,
    ) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"early_stopping.patience must be at least 1 or null, got {patience}")
        super().__init__(
            monitor=monitor,
            mode=mode,
            min_delta=min_delta,
            check_on_train_epoch_end=check_on_train_epoch_end,
            **kwargs,
        )
        self.patience = patience  # type: ignore[assignment]

    # a private hook of EarlyStopping: checked by src.compat.PRIVATE_HOOKS
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if self.patience is None:
            return
        stopping = trainer.should_stop
        super()._run_early_stopping_check(trainer)
        if trainer.should_stop and not stopping:  # this check stopped the fit: say why, once
            step = trainer.global_step
            rank_zero_info(f"[early stopping] {self._why()}: stopping at step {step}")

    def _why(self) -> str:
        if self.wait_count >= self.patience:  # patience ran out (set: checked only then)
            return (
                f"{self.monitor} has not improved on {self.best_score.item():.4f} "
                f"for {self.wait_count} validations"
            )
        # a non-finite value or a threshold (in Lightning's words, where it keeps them), or
        # another rank's decision
        reason = getattr(self, "stopping_reason_message", None)
        reason = reason or f"{self.monitor}: another process decided"
        return reason.removesuffix(" Signaling Trainer to stop.")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience  # the one configured now, not the checkpoint's
        super().load_state_dict(state_dict)
        self.patience = patience


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
