"""Label masks from the chat template: only assistant turns, each with its end-of-turn token."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from src.datamodules.chat import IGNORE_INDEX, prompt_messages, tokenize_conversation
from tests.conftest import conversation, trained_runs

# A Llama-3-style template without {% generation %} markers that adds a date line the
# messages do not contain, and a BOS of its own.
LLAMA3_STYLE = (
    "{{- bos_token }}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: 23 Nov 2026\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- set messages = messages[1:] %}{%- endif %}{{- '<|eot_id|>' }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- m['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def test_multi_turn_with_system_prompt_trains_assistant_turns_and_their_end(tokenizer):
    row = conversation(
        "What is 12 + 30?", "42", "Now add 5 to that.", "47", system="You are a terse assistant."
    )
    tok = tokenize_conversation(tokenizer, row["messages"])
    assert trained_runs(tokenizer, tok) == ["42<|im_end|>", "47<|im_end|>"]
    assert tokenizer.decode(tok.input_ids).startswith("<|im_start|>system\nYou are a terse")
    # The end-of-turn token of each assistant turn is trained; none of the others is.
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(t == eot for t in tok.input_ids) == 5
    assert sum(label == eot for label in tok.labels) == 2


def test_no_assistant_turn_gives_no_labels(tokenizer):
    tok = tokenize_conversation(tokenizer, [{"role": "user", "content": "hello"}])
    assert all(label == IGNORE_INDEX for label in tok.labels)


def _llama3_like(tokenizer) -> PreTrainedTokenizerFast:
    other = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    other.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
        }
    )
    other.chat_template = LLAMA3_STYLE
    return other


def test_template_with_injected_text_and_bos_masks_right_and_has_one_bos(tokenizer):
    other = _llama3_like(tokenizer)
    row = conversation(
        "Reverse the words: red fox", "fox red", "Uppercase it.", "FOX RED", system="Be brief."
    )
    tok = tokenize_conversation(other, row["messages"])
    assert trained_runs(other, tok) == ["fox red<|eot_id|>", "FOX RED<|eot_id|>"]
    assert tok.input_ids.count(other.bos_token_id) == 1
    assert tok.input_ids[0] == other.bos_token_id


def test_prompt_messages_stop_before_last_assistant_turn():
    messages = conversation("a", "b", "c", "d")["messages"]
    assert prompt_messages(messages) == messages[:3]


# A Qwen3-style template that drops the reasoning of earlier assistant turns, so the rendering
# of a prefix is not a prefix of the whole conversation.
THINK_STRIPPING = (
    "{%- for m in messages %}"
    "{%- set content = m['content'] %}"
    "{%- if m['role'] == 'assistant' and not loop.last and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_template_that_rewrites_earlier_turns_never_trains_user_text(tokenizer):
    other = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    other.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    other.chat_template = THINK_STRIPPING
    row = conversation(
        "What is 1 + 1?", "<think>one and one</think> 2", "And 2 + 2?", "<think>two</think> 4"
    )
    tok = tokenize_conversation(other, row["messages"])
    assert trained_runs(other, tok) == ["2<|im_end|>", "<think>two</think> 4<|im_end|>"]
