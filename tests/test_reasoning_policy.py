"""The ``reasoning`` setting: strip, keep the last turn's, keep every turn's, under the
templates of real reasoning models (see ``tests/chat_families.py``)."""

from __future__ import annotations

import pytest

from src.datamodules.chat import ChatEncoder
from tests.chat_families import (
    ANSWERS,
    DS_EOS,
    FAMILIES,
    GLM_NO_THINK,
    HARMONY_FINAL,
    REASONING,
    build,
    conversation,
)
from tests.conftest import trained_runs

R1, R2 = REASONING
A1, A2 = ANSWERS
THINK = "<think>\n{}\n</think>\n\n{}"
ANALYSIS = "<|channel|>analysis<|message|>{}<|end|><|start|>assistant" + HARMONY_FINAL + "{}"

# family -> policy -> the trained runs of the two-turn reasoning conversation
EXPECTED = {
    "qwen3": {
        # the template keeps the reasoning after the last user query, with an empty block
        # on the last turn when it has none
        "template": [A1 + "<|im_end|>", THINK.format(R2, A2) + "<|im_end|>"],
        "strip": [A1 + "<|im_end|>", "<think>\n\n</think>\n\n" + A2 + "<|im_end|>"],
        "keep_last": [A1 + "<|im_end|>", THINK.format(R2, A2) + "<|im_end|>"],
        "keep_all": [THINK.format(R1, A1) + "<|im_end|>", THINK.format(R2, A2) + "<|im_end|>"],
    },
    "deepseek-r1-distill": {
        # the generation prompt opens "<think>\n": the model writes the rest of the block
        "template": [A1 + DS_EOS, A2 + DS_EOS],
        "strip": [A1 + DS_EOS, A2 + DS_EOS],
        "keep_last": [A1 + DS_EOS, f"{R2}\n</think>\n\n{A2}{DS_EOS}"],
        "keep_all": [f"{R1}\n</think>\n\n{A1}{DS_EOS}", f"{R2}\n</think>\n\n{A2}{DS_EOS}"],
    },
    "gpt-oss": {
        "template": [HARMONY_FINAL + A1 + "<|end|>", ANALYSIS.format(R2, A2) + "<|return|>"],
        "strip": [HARMONY_FINAL + A1 + "<|end|>", HARMONY_FINAL + A2 + "<|return|>"],
        "keep_last": [HARMONY_FINAL + A1 + "<|end|>", ANALYSIS.format(R2, A2) + "<|return|>"],
        "keep_all": [ANALYSIS.format(R1, A1) + "<|end|>", ANALYSIS.format(R2, A2) + "<|return|>"],
    },
    "glm-4.5": {
        "template": [GLM_NO_THINK + A1 + "<|user|>", f"\n<think>{R2}</think>\n{A2}<|endoftext|>"],
        "strip": [GLM_NO_THINK + A1 + "<|user|>", GLM_NO_THINK + A2 + "<|endoftext|>"],
        "keep_all": [
            f"\n<think>{R1}</think>\n{A1}<|user|>",
            f"\n<think>{R2}</think>\n{A2}<|endoftext|>",
        ],
    },
}
CASES = [(family, policy) for family, policies in EXPECTED.items() for policy in policies]


@pytest.fixture(scope="module")
def toks(tokenizer):
    return {name: build(FAMILIES[name], tokenizer) for name in EXPECTED}


def encode(tok, family: str, policy: str, messages=None, train_on: str = "assistant"):
    if messages is None:
        messages, _ = conversation(FAMILIES[family], "reasoning")
    encoder = ChatEncoder(tok, train_on, list(FAMILIES[family].stop), reasoning=policy)
    return encoder.encode([{"messages": messages}], ["row"])[0]


@pytest.mark.parametrize(("family", "policy"), CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_reasoning_policy_trains_the_expected_text(toks, family, policy):
    tok = toks[family]
    tokenized = encode(tok, family, policy)
    assert trained_runs(tok, tokenized) == EXPECTED[family][policy]
    kept = {"template": (), "strip": (), "keep_last": (R2,), "keep_all": (R1, R2)}[policy]
    text = tok.decode(tokenized.input_ids)
    for reasoning in REASONING:
        if reasoning in kept:
            assert reasoning in text
        elif policy != "template":
            assert reasoning not in text
    # each template drops the first turn's reasoning; a policy that removes or puts back
    # reasoning leaves nothing for the data summary to report
    assert ("reasoning" in tokenized.dropped) == (policy == "template")


def test_keep_last_trains_only_the_last_turn_with_last_assistant(toks):
    tok = toks["deepseek-r1-distill"]
    tokenized = encode(tok, "deepseek-r1-distill", "keep_last", train_on="last_assistant")
    assert trained_runs(tok, tokenized) == [f"{R2}\n</think>\n\n{A2}{DS_EOS}"]
    # the "<think>\n" of the generation prompt is in the ids, untrained, before the reasoning
    assert f"<｜Assistant｜><think>\n{R2}" in tok.decode(tokenized.input_ids)


def test_think_blocks_in_content_follow_the_policy_too(toks):
    tok = toks["qwen3"]
    messages, _ = conversation(FAMILIES["qwen3"], "reasoning")
    for m, reasoning in zip(
        [m for m in messages if m["role"] == "assistant"], REASONING, strict=True
    ):
        m["content"] = (
            f"<think>\n{reasoning}\n</think>\n\n{m.pop('reasoning_content') and m['content']}"
        )
    assert (
        trained_runs(tok, encode(tok, "qwen3", "keep_all", messages))
        == EXPECTED["qwen3"]["keep_all"]
    )
    assert trained_runs(tok, encode(tok, "qwen3", "strip", messages)) == EXPECTED["qwen3"]["strip"]
