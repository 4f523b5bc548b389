"""What the chat template did to the data, in the data summary; stop tokens in preference
pairs and after a last turn the template leaves open."""

from __future__ import annotations

import pytest

from src.datamodules import PreferenceDataModule, SFTDataModule
from tests.conftest import (
    CHATML,
    SYSTEM_ON_LAST_USER,
    conversation,
    save_chat_tokenizer,
    write_jsonl,
)

# GLM-4.5: role tokens and no end-of-turn token; the last turn is closed by nothing.
ROLE_TOKENS_ONLY = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
# Phi-3: turns close with <|end|>, a rendering without generation prompt ends with the EOS.
PHI_LIKE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
}


def sft(tmp_path, tokenizer_dir: str, rows: list, **kwargs) -> SFTDataModule:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = SFTDataModule(
        tokenizer=tokenizer_dir, train_files=str(path), val_split=0.0, cache_dir=None, **kwargs
    )
    dm.setup("fit")
    return dm


def test_the_summary_counts_conversations_whose_system_prompt_was_dropped(tokenizer, tmp_path):
    tok = save_chat_tokenizer(tokenizer, tmp_path / "tok", SYSTEM_ON_LAST_USER)
    rows = [conversation("Say hi.", "hi", system="Be brief.") for _ in range(3)]
    rows.append(conversation("Say yo.", "yo"))
    with pytest.warns(UserWarning, match="--check-template"):
        summary = sft(tmp_path, tok, rows).stats["train"].summary("train")
    assert "3 conversations whose system prompt the chat template dropped" in summary


def test_the_summary_counts_conversations_whose_tool_calls_were_dropped(tokenizer, tmp_path):
    tok = save_chat_tokenizer(tokenizer, tmp_path / "tok", CHATML)  # it never reads tool_calls
    dm = sft(tmp_path, tok, [TOOL_ROW, TOOL_ROW, conversation("Say hi.", "hi")])
    summary = dm.stats["train"].summary("train")
    assert "2 conversations whose tool calls the chat template dropped" in summary
    assert "assistant content" not in summary  # "Let me look." is rendered


def test_a_last_turn_left_open_gets_the_stop_token_trained(tokenizer, tmp_path):
    tok = save_chat_tokenizer(tokenizer, tmp_path / "tok", ROLE_TOKENS_ONLY, ROLES)
    dm = sft(tmp_path, tok, [conversation("Say hi.", "hi", "Say yo.", "yo")])
    row = dm.datasets["train"][0]
    t = dm.tokenizer
    trained = [t.decode([i]) for i in row["labels"] if i != -100]
    # the earlier turn trains the role token that closes it, the last one the EOS appended
    assert "".join(trained) == "hi<|user|>yo<|im_end|>"
    assert row["input_ids"][-1] == t.eos_token_id
    summary = dm.stats["train"].summary("train")
    assert "1 last turns the template leaves open, closed with <|im_end|>" in summary


def test_stop_token_setting_names_the_appended_token(tokenizer, tmp_path):
    tok = save_chat_tokenizer(tokenizer, tmp_path / "tok", ROLE_TOKENS_ONLY, ROLES)
    dm = sft(tmp_path, tok, [conversation("Say hi.", "hi")], stop_token="<|endoftext|>")
    row = dm.datasets["train"][0]
    assert row["input_ids"][-1] == row["labels"][-1] == dm.tokenizer.pad_token_id
    assert "closed with <|endoftext|>" in dm.stats["train"].summary("train")


def test_turns_without_any_stop_token_are_counted(tokenizer, tmp_path):
    plain = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tok = save_chat_tokenizer(tokenizer, tmp_path / "tok", plain)
    dm = sft(tmp_path, tok, [conversation("Say hi.", "hi", "Say yo.", "yo")])
    summary = dm.stats["train"].summary("train")
    assert "1 assistant turns with no token generation stops on (set data.stop_token)" in summary


def test_preference_responses_stop_at_the_turn_end_not_the_closing_eos(tokenizer, tmp_path):
    tok = save_chat_tokenizer(tokenizer, tmp_path / "tok", PHI_LIKE, ("<|end|>", *ROLES))
    rows = [{"prompt": "Say hi.", "chosen": "hi", "rejected": "go away"}] * 2
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(
        tokenizer=tok, train_files=str(path), val_split=0.0, cache_dir=None, max_length=64
    )
    dm.setup("fit")
    row, t = dm.datasets["train"][0], dm.tokenizer
    for side, answer in (("chosen", "hi"), ("rejected", "go away")):
        labels = [i for i in row[f"{side}_labels"] if i != -100]
        assert t.decode(labels) == answer + "<|end|>"
        assert t.decode(row[f"{side}_input_ids"]).endswith("<|assistant|>\n" + answer + "<|end|>")
