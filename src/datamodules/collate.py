"""Batch collation: dynamic right padding to the longest row of the batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from src.datamodules.chat import IGNORE_INDEX


class PaddingCollator:
    """Pads ``input_ids`` with the pad id, ``labels`` with -100, and builds ``attention_mask``.

    ``pad_to_multiple_of`` rounds the padded length up (8 suits tensor cores on a GPU).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
