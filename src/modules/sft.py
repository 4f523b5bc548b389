"""Supervised fine-tuning: next-token cross-entropy on the label tokens."""

from __future__ import annotations

from typing import Any

import torch

from src.modules.base import CausalLMModule, LossTerms
from src.modules.losses import token_sums


class SFTModule(CausalLMModule):
    """Masked cross-entropy, averaged over every label token of an optimizer step (weighted
    by the examples' loss weights in training, when the data give any).

    Args:
        label_smoothing: Label smoothing of the cross-entropy (0 = none).
        **kwargs: See ``CausalLMModule``.
    """

    log_perplexity = True

    def __init__(self, *args: Any, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        lp = self.label_logps(batch, smoothing=self.label_smoothing > 0)
        loss_sum, count, correct = token_sums(lp, self.label_smoothing, self.loss_weights(batch))
        return LossTerms(loss_sum, count, {"token_accuracy": correct})
