"""Chat rendering with the tokenizer's own template, and labels on the assistant turns only.

The template is treated as a black box: the character span of assistant turn ``i`` starts
where the rendering of ``messages[:i]`` with the generation prompt stops, and ends where the
rendering of ``messages[:i + 1]`` stops (trailing white space excluded). That span holds the
turn's end-of-turn token, so the model learns to stop, and it works for templates that add
text the messages do not contain (default system prompts, date lines) and for templates
without ``{% generation %}`` markers. Where a template rewrites earlier turns, so that a
prefix rendering is not a prefix of the whole, the content is found by search instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
Message = dict[str, Any]


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], **kwargs: Any) -> str:
    """The conversation as text, through the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], text: str
) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the whole rendering) to train on: the assistant turns.

    Raises ``ValueError`` when an assistant turn cannot be located in the rendering.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        content = msg.get("content") or ""
        start = _prefix_end(text, render(tokenizer, messages[:i], add_generation_prompt=True))
        if start is None or start < cursor:
            start = text.find(content, cursor) if content else -1
            if start < 0:
                raise ValueError(f"assistant message {i} is not in the chat template's rendering")
        end = _prefix_end(text, render(tokenizer, messages[: i + 1]))
        if end is None or end <= start:
            end = _turn_end(tokenizer, text, start, i)
        end = len(text[:end].rstrip())
        spans.append((start, end))
        cursor = end
    return spans


def _prefix_end(text: str, prefix: str) -> int | None:
    return len(prefix) if prefix and text.startswith(prefix) else None


def _turn_end(tokenizer: PreTrainedTokenizerBase, text: str, start: int, index: int) -> int:
    """Through the first end-of-turn token after ``start``: templates that rewrite a turn
    (dropping reasoning from earlier turns, say) still close it with that token."""
    eos = tokenizer.eos_token
    pos = text.find(eos, start) if eos else -1
    if pos < 0:
        raise ValueError(f"assistant message {index}: no end-of-turn token {eos!r} after it")
    return pos + len(eos)


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> Tokenized:
    """Token ids of the rendered conversation and labels that are -100 outside assistant turns.

    The template writes any BOS itself; one is added only for a tokenizer that expects one and
    a template that left it out, so a conversation never starts with two.
    """
    text = render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_idx = 0
    for t, (tok_start, _) in enumerate(enc["offset_mapping"]):
        while span_idx < len(spans) and tok_start >= spans[span_idx][1]:
            span_idx += 1
        if span_idx == len(spans):
            break
        if tok_start >= spans[span_idx][0]:
            labels[t] = input_ids[t]
    bos = missing_bos(tokenizer, text)
    if bos is not None:
        input_ids, labels = [bos, *input_ids], [IGNORE_INDEX, *labels]
    return Tokenized(input_ids, labels)


def missing_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    bos_token, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos_token is None or bos_id is None or text.startswith(bos_token):
        return None
    adds_bos = tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos_id]
    return bos_id if adds_bos else None


def prompt_messages(messages: list[Message]) -> list[Message]:
    """The conversation up to (not including) its last assistant turn: a generation prompt."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return list(messages if last is None else messages[:last])
