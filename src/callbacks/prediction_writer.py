"""``predict`` output: one JSON line per prompt, in input order (``<run>/predictions.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from src.callbacks.run_dir import run_dir

DEFAULT_NAME = "predictions.jsonl"


class PredictionWriter(BasePredictionWriter):
    """Write each prediction (prompt, reference, output, and the prompt row's ``id`` if it had
    one) as a JSON line, every prompt once, in the order of the input.

    On one device the lines are appended batch by batch; on several, each rank predicts a
    share of the prompts and rank 0 writes them all, in order, when prediction ends.

    Args:
        output: The JSON Lines file to write (replaced if it exists). Default:
            ``predictions.jsonl`` in the run directory, unless another ``PredictionWriter``
            names its ``output``: then that one writes, e.g. with ``--trainer.callbacks+=
            src.callbacks.PredictionWriter --trainer.callbacks.output=out.jsonl``.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._path: Path | None = None
        self._buffer: list[tuple[int, dict[str, Any]]] = []
        self._written = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buffer = []
        self._path = None
        self._written = 0
        if not trainer.is_global_zero:
            return
        folder = run_dir(trainer)
        if self.output is None and (folder is None or _another_names_a_file(self, trainer)):
            return
        self._path = Path(self.output) if self.output else Path(folder) / DEFAULT_NAME
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._path.write_text("", encoding="utf-8")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        indices = list(batch_indices) if batch_indices else [None] * len(prediction)
        ids = getattr(trainer.datamodule, "predict_ids", None) or []
        rows = []
        for index, row in zip(indices, prediction, strict=True):
            if index is not None and index < len(ids) and ids[index] is not None:
                row = {"id": ids[index], **row}
            rows.append((index, row))
        if trainer.world_size > 1:
            self._buffer += rows
        elif self._path is not None:
            self._append([row for _, row in rows])

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        shares: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(shares, self._buffer)
        self._buffer = []
        if self._path is None:
            return
        rows = [item for share in shares for item in share]
        if any(i is None for i, _ in rows):  # a loader without a sampler Lightning can track
            self._append([row for _, row in rows])
            return
        # the loader repeats the last prompt so that every rank gets as many: drop repeats
        count = len(getattr(trainer.datamodule, "predict_ids", None) or []) or None
        by_index = {i: row for i, row in rows if count is None or i < count}
        self._append([by_index[i] for i in sorted(by_index)])

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._path is not None:  # only the writing rank has one
            rank_zero_info(f"[predict] {self._written} predictions written to {self._path}")

    def _append(self, rows: list[dict[str, Any]]) -> None:
        assert self._path is not None
        with open(self._path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._written += len(rows)


def _another_names_a_file(writer: PredictionWriter, trainer: pl.Trainer) -> bool:
    """Whether another writer names an ``output``: the default one (in the run directory)
    then stands down, so one appended on the command line replaces it."""
    return any(
        isinstance(c, PredictionWriter) and c is not writer and c.output for c in trainer.callbacks
    )
