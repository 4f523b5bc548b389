"""``predict`` output: one JSON line per prompt in ``<run>/predictions.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from src.callbacks.run_dir import run_dir


class PredictionWriter(BasePredictionWriter):
    """Append each predicted batch (prompt, reference, output) to a JSON Lines file.

    Args:
        filename: File name inside the run directory.
    """

    def __init__(self, filename: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename

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
        if not trainer.is_global_zero or run_dir(trainer) is None:
            return
        path = Path(run_dir(trainer)) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for row in prediction:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
