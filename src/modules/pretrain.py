"""Pretraining: next-token cross-entropy on every token of the packed blocks."""

from __future__ import annotations

from src.modules.sft import SFTModule


class PretrainModule(SFTModule):
    """The SFT objective on pretraining blocks: every token but each document's first is a
    label (the data module decides), so the two objectives share one loss.

    Args:
        **kwargs: See ``SFTModule`` and ``CausalLMModule``.
    """
