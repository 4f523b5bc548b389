"""Shared fixtures: the committed tiny tokenizer, a smaller model config, data writers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "tiny-llama"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from src.datamodules.tokenizer import load_tokenizer

    return load_tokenizer(str(ASSETS))


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A directory holding a 2-layer, 64-wide Llama config and the tiny tokenizer."""
    path = tmp_path_factory.mktemp("micro-llama")
    LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def conversation(*turns: str, system: str | None = None) -> dict:
    """A ``messages`` row alternating user and assistant turns."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    messages += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


def trained_runs(tokenizer, tokenized) -> list[str]:
    """Decoded runs of consecutive trained tokens; every trained label is its input id."""
    runs, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# Small templates for the tiny tokenizer. CHATML never reads tool_calls. SYSTEM_ON_LAST_USER is
# Mistral v0.3 / Nemo's habit: the system prompt goes into the last user turn only when that
# turn is the conversation's last message, so a conversation ending with an answer loses it.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM_ON_LAST_USER = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if loop.last and system is defined %}{{ '[INST] ' + system + '\\n\\n' + m['content'] "
    "+ ' [/INST]' }}{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def save_chat_tokenizer(tokenizer, path: Path, template: str, extra: tuple[str, ...] = ()) -> str:
    """The tiny tokenizer with ``template`` and the special tokens ``extra``, saved to ``path``."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if extra:
        special["additional_special_tokens"] = list(extra)
    tok.add_special_tokens(special)
    tok.chat_template = template
    tok.save_pretrained(path)
    return str(path)
