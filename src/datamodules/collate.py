"""Batch collation: padded rows, packed rows (position ids per document), preference pairs.

Every batch also carries ``real_tokens`` (non-pad tokens) and ``token_slots`` (token
positions of its id tensors, chosen and rejected both), which the module's
``train/padding_efficiency`` and the throughput callback read, whatever the objective.
Batches holding examples with a loss weight other than 1 carry ``loss_weights`` per label
position (``loss_weight`` per preference pair). Every 2-D tensor of a batch is (rows, row
length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from src.datamodules.chat import IGNORE_INDEX

Row = dict[str, Any]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_rows(
    rows: Sequence[list[int]], pad_token_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Token id lists as a right-padded ``input_ids`` batch with its ``attention_mask``."""
    width = _round_up(max(len(r) for r in rows), max(1, pad_to_multiple_of))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


class Collator:
    """Rows to a right-padded batch; packed rows get position ids and no attention mask.

    Rows without ``labels`` are trained on every token (pretraining). Rows with
    ``seq_lengths`` (packed) get ``position_ids`` restarting at 0 for every document and the
    first label of each document set to -100, so no document sees or predicts another; the
    padding tail is a document of its own. Without an attention mask, transformers derives
    the block-diagonal mask from the position ids.

    Args:
        pad_token_id: Id written into padding.
        pad_to_multiple_of: Round the padded length up (8 suits tensor cores on a GPU).
        padding_free: Concatenate the packed rows of a batch into one row: no padding
            between rows at all (for flash attention's variable-length kernels).
    """

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int = 1, padding_free: bool = False
    ) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)
        self.padding_free = padding_free

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        packed = "seq_lengths" in rows[0]
        if packed and self.padding_free:
            rows = [_concatenate(rows)]
        width = _round_up(max(len(r["input_ids"]) for r in rows), self.pad_to_multiple_of)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        lengths = [len(r["input_ids"]) for r in rows]
        for i, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            input_ids[i, : len(ids)] = ids
            labels[i, : len(ids)] = torch.as_tensor(row["labels"]) if "labels" in row else ids
        batch = {"input_ids": input_ids, "labels": labels}
        if packed:
            position_ids = torch.zeros(shape, dtype=torch.long)
            for i, row in enumerate(rows):
                start = 0
                for n in [*row["seq_lengths"], width - lengths[i]]:
                    if n > 0:
                        position_ids[i, start : start + n] = torch.arange(n)
                        labels[i, start] = IGNORE_INDEX
                    start += n
            batch["position_ids"] = position_ids
        else:
            batch["attention_mask"] = (
                torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]
            ).long()
        weights = _token_weights(rows, shape)
        if weights is not None:
            batch["loss_weights"] = weights
        batch["real_tokens"] = torch.tensor(sum(lengths))
        batch["token_slots"] = torch.tensor(input_ids.numel())
        return batch


def _token_weights(rows: Sequence[Row], shape: tuple[int, int]) -> torch.Tensor | None:
    """Each label position's loss weight (its document's), or None when every weight is 1."""
    if not any(r.get("loss_weight", 1.0) != 1.0 or "seq_weights" in r for r in rows):
        return None
    weights = torch.ones(shape)
    for i, row in enumerate(rows):
        if "seq_weights" in row:
            start = 0
            for n, w in zip(row["seq_lengths"], row["seq_weights"], strict=True):
                weights[i, start : start + n] = w
                start += n
        else:
            weights[i] = row.get("loss_weight", 1.0)
    return None if bool((weights == 1).all()) else weights


def _concatenate(rows: Sequence[Row]) -> Row:
    out: Row = {"input_ids": [], "seq_lengths": []}
    for key in ("labels", "seq_weights"):
        if key in rows[0]:
            out[key] = []
    for row in rows:
        for key in out:
            out[key].extend(row[key])
    return out


class PreferenceCollator:
    """Chosen and rejected rows padded to one common width, with their attention masks.

    Packed rows (``seq_lengths``: each pair's chosen then rejected sequence) become one
    batch of rows with ``position_ids`` restarting per sequence and ``sequence_ids``: each
    token's sequence in the order of the unpacked batch, the batch's chosen sequences
    ``0 .. P-1`` then its rejected ones ``P .. 2P-1``, pairs numbered row by row; with
    ``sequence_count`` (2P), ``row_pairs`` (pairs per row) and ``examples`` (P); padding is
    sequence -1. Per-pair columns (``PAIR_COLUMNS``: reference log-probs, loss weights,
    margins) are flattened in the same pair order.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)
        self.packed_rows = Collator(pad_token_id, pad_to_multiple_of)

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        if "seq_lengths" in rows[0]:
            return self._packed(rows)
        longest = max(len(r[f"{s}_input_ids"]) for r in rows for s in ("chosen", "rejected"))
        width = _round_up(longest, self.pad_to_multiple_of)
        batch: dict[str, torch.Tensor] = {}
        real = 0
        for side in ("chosen", "rejected"):
            ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                n = len(row[f"{side}_input_ids"])
                ids[i, :n] = torch.as_tensor(row[f"{side}_input_ids"])
                labels[i, :n] = torch.as_tensor(row[f"{side}_labels"])
                mask[i, :n] = 1
                real += n
            batch |= {
                f"{side}_input_ids": ids,
                f"{side}_labels": labels,
                f"{side}_attention_mask": mask,
            }
        batch |= pair_columns(rows)
        batch["real_tokens"] = torch.tensor(real)
        batch["token_slots"] = torch.tensor(2 * len(rows) * width)
        return batch

    def _packed(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        # the rows' tokens, labels, positions and counts as for packed SFT rows
        batch = self.packed_rows(
            [{k: r[k] for k in ("input_ids", "labels", "seq_lengths")} for r in rows]
        )
        row_pairs = [len(r["seq_lengths"]) // 2 for r in rows]
        pairs = sum(row_pairs)
        sequence_ids = torch.full_like(batch["input_ids"], -1)  # -1: padding
        first = 0
        for i, row in enumerate(rows):
            start = 0
            for k, n in enumerate(row["seq_lengths"]):
                pair, rejected = first + k // 2, k % 2
                sequence_ids[i, start : start + n] = pair + rejected * pairs
                start += n
            first += row_pairs[i]
        batch |= {
            "sequence_ids": sequence_ids,
            "sequence_count": torch.tensor(2 * pairs),
            "row_pairs": torch.tensor(row_pairs),
            "examples": torch.tensor(pairs),
        }
        return batch | pair_columns(rows, row_pairs)


# per-pair columns -> the value of a pair without one (None: only ever all present or absent)
PAIR_COLUMNS = {
    "ref_chosen_logps": None,
    "ref_rejected_logps": None,
    "loss_weight": 1.0,
    "margin": 0.0,
}


def pair_columns(
    rows: Sequence[Row], row_pairs: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """The per-pair columns of a batch, one value per pair in batch order: a value per row,
    or with ``row_pairs`` (packed rows) a list per row. A column whose every value is its
    neutral one is left out (unweighted pairs carry no weights)."""
    out = {}
    for key, neutral in PAIR_COLUMNS.items():
        if neutral is None and key not in rows[0]:
            continue
        values: list[float] = []
        for i, row in enumerate(rows):
            value = row.get(key, neutral)
            if row_pairs is None:
                values.append(value)
            else:  # packed: a list per row, or the neutral value once per pair of the row
                values += value if isinstance(value, list) else [value] * row_pairs[i]
        if neutral is None or any(v != neutral for v in values):
            out[key] = torch.tensor(values, dtype=torch.float32)
    return out


class UnpairedCollator:
    """Unpaired preference rows (KTO): each row's sequence and its mismatched KL sequence (its
    prompt with another row's completion), padded to one common width so that a model can run
    both in one forward (the reference does), each with its attention mask.

    ``label`` is 1.0 for a desirable completion and 0.0 for an undesirable one; per-row
    columns: ``loss_weight`` when some weight is not 1, and the precomputed ``ref_logps``
    and ``ref_kl_logps``. ``real_tokens`` and ``token_slots`` count both sequences.
    """

    SEQUENCES = ("", "kl_")  # the matched rows' keys, then the KL rows' (``kl_input_ids``)

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        lengths = {s: [len(r[f"{s}input_ids"]) for r in rows] for s in self.SEQUENCES}
        width = _round_up(max(max(n) for n in lengths.values()), self.pad_to_multiple_of)
        batch: dict[str, torch.Tensor] = {}
        for s, n in lengths.items():
            batch[f"{s}input_ids"] = _right_padded(rows, f"{s}input_ids", width, self.pad_token_id)
            batch[f"{s}labels"] = _right_padded(rows, f"{s}labels", width, IGNORE_INDEX)
            batch[f"{s}attention_mask"] = (torch.arange(width) < torch.tensor(n)[:, None]).long()
        batch["label"] = torch.tensor([float(r["label"]) for r in rows])
        for key in ("ref_logps", "ref_kl_logps"):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        weights = [r.get("loss_weight", 1.0) for r in rows]
        if any(w != 1.0 for w in weights):
            batch["loss_weight"] = torch.tensor(weights, dtype=torch.float32)
        batch["real_tokens"] = torch.tensor(sum(sum(n) for n in lengths.values()))
        batch["token_slots"] = torch.tensor(len(self.SEQUENCES) * len(rows) * width)
        return batch


def _right_padded(rows: Sequence[Row], key: str, width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row[key])] = torch.as_tensor(row[key], dtype=torch.long)
    return out
