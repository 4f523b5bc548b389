"""Preference pairs as one batch of sequences: what DPO and the reward model run."""

from __future__ import annotations

import torch

PACKED_INPUTS = ("input_ids", "labels", "position_ids", "sequence_ids", "sequence_count")


def pair_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows as one batch (the collator pads both to one width);
    packed rows as they are, their sequences numbered chosen then rejected."""
    if "sequence_ids" in batch:
        return {key: batch[key] for key in PACKED_INPUTS if key in batch}
    return {
        key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
        for key in ("input_ids", "attention_mask", "labels")
    }
