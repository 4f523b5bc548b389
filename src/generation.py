"""Batched completion of chat prompts with a Hugging Face model and its tokenizer."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from src.datamodules.chat import clear_padding, generation_stop_ids, prompt_texts

Message = dict[str, Any]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[Message]],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    synced_gpus: bool = False,
    top_p: float | None = None,
) -> list[str]:
    """Completions of chat prompts (rendered with the generation prompt), batched, left-padded.

    ``synced_gpus`` keeps every rank stepping until all are done, for sharded models whose
    forward passes are collectives. ``top_p`` (nucleus sampling) applies with ``do_sample``.
    """
    texts = prompt_texts(tokenizer, prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
        clear_padding(tokenizer)  # the shared tokenizer goes back to encoding unpadded
    enc = enc.to(model.device)
    new_tokens = generate_ids(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens,
        tokenizer.pad_token_id,
        generation_stop_ids(tokenizer),
        do_sample,
        temperature,
        top_p,
        synced_gpus,
    )
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int,
    stop_ids: list[int],
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    synced_gpus: bool = False,
) -> torch.Tensor:
    """The new tokens ``(rows, <= max_new_tokens)`` after left-padded prompts, in eval mode
    (no dropout); a row that stopped early is padded with ``pad_token_id`` after its stop."""
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=None,
            pad_token_id=pad_token_id,
            eos_token_id=stop_ids,
            use_cache=True,
            synced_gpus=synced_gpus,
        )
    finally:
        model.train(was_training)
    return out[:, input_ids.shape[1] :]
