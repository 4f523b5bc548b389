"""Losses as pure functions of logits and labels (and, later, of log-probabilities)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over the label tokens (labels != -100).

    ``logits[:, t]`` predicts ``labels[:, t + 1]``, the Hugging Face convention. Returns the
    summed loss, the number of label tokens and the number predicted right (argmax), so the
    caller can take the mean over every token of an optimizer step rather than a mean of means.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits[:, :-1][mask].float()
    targets = targets[mask]
    loss_sum = F.cross_entropy(picked, targets, reduction="sum", label_smoothing=label_smoothing)
    correct = (picked.argmax(dim=-1) == targets).sum()
    return loss_sum, mask.sum(), correct
