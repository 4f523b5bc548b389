"""Batched completion of chat prompts with a Hugging Face model and its tokenizer."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from src.datamodules.chat import clear_padding, generation_stop_ids, missing_bos

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
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    # the same BOS rule as the training rows (see ChatEncoder.encode)
    texts = [t if missing_bos(tokenizer, t) is None else tokenizer.bos_token + t for t in texts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
        clear_padding(tokenizer)  # the shared tokenizer goes back to encoding unpadded
    enc = enc.to(model.device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=generation_stop_ids(tokenizer),
            use_cache=True,
            synced_gpus=synced_gpus,
        )
    finally:
        model.train(was_training)
    new_tokens = out[:, enc["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
