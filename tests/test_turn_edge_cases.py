"""Label masks on the inputs that break naive turn finding: answers whose text recurs in a
header, prompts that render differently in the whole, tool-call turns, reasoning put back,
preference responses of several messages.

DESIGN rule 9: an assistant turn trains what the model writes after the generation prompt,
through the token generation stops on; nothing after it, no header, no prompt; what the
template drops is counted.
"""

from __future__ import annotations

import pytest

from src.datamodules import PreferenceDataModule
from src.datamodules.chat import ChatEncoder
from tests.chat_families import (
    DS_EOS,
    EMPTY_THINK,
    FAMILIES,
    HARMONY_FINAL,
    TOOL_CALL_ID,
    TOOLS,
    build,
)
from tests.conftest import (
    CHATML,
    SYSTEM_ON_LAST_USER,
    save_chat_tokenizer,
    trained_runs,
    write_jsonl,
)

CALL = {
    "id": TOOL_CALL_ID,
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}
GPT_OSS_CALL = (
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
    "<|call|>"
)
GLM_CALL = (
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"
)


def user(content):
    return {"role": "user", "content": content}


def answer(content, reasoning=None, **extra):
    message = {"role": "assistant", "content": content, **extra}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def tool_result(content):
    return {"role": "tool", "tool_call_id": TOOL_CALL_ID, "content": content}


def encode(tokenizer, family, messages, tools=None, **kwargs):
    tok = build(FAMILIES[family], tokenizer)
    encoder = ChatEncoder(tok, stop_tokens=list(FAMILIES[family].stop), **kwargs)
    tokenized = encoder.encode([{"messages": messages, "tools": tools}], ["row 1"])[0]
    return tok, tokenized


# ---------------------------------------------------------------------------------------------
# Turn boundaries


def test_qwen3_one_letter_answer_does_not_train_the_next_user_header(tokenizer):
    """Qwen3, answers of one letter: "a" recurs inside the next ``<|im_start|>``,
    and the turn still ends at its own ``<|im_end|>``, nothing after it, nothing unstopped."""
    messages = [user("Pick one: a or b?"), answer("a"), user("And now?"), answer("b")]
    tok, tokenized = encode(tokenizer, "qwen3", messages)
    assert trained_runs(tok, tokenized) == ["a<|im_end|>", EMPTY_THINK + "b<|im_end|>"]
    assert tokenized.unstopped == 0


@pytest.mark.parametrize(
    "next_user, last",
    [
        ([{"type": "text", "text": "And again?"}], "ok"),  # content parts: Qwen3 renders ""
        ("", "ok, done"),  # an empty user turn
    ],
    ids=["content-parts", "empty"],
)
def test_qwen3_user_turn_rendered_empty_does_not_reject_the_row(tokenizer, next_user, last):
    """Qwen3 writes a user message whose content is a list of parts (or empty) as ``""``.
    When the earlier answer's text comes back later, the first turn still stops where the
    next message's rendering begins: both turns trained through their ``<|im_end|>``."""
    messages = [user("Say ok."), answer("ok"), user(next_user), answer(last)]
    tok, tokenized = encode(tokenizer, "qwen3", messages)
    assert trained_runs(tok, tokenized) == ["ok<|im_end|>", EMPTY_THINK + last + "<|im_end|>"]


def test_deepseek_r1_answer_starting_with_a_tag_is_trained_whole(tokenizer):
    """DeepSeek-R1 (the generation prompt opens ``<think>\n``), an answer that starts with
    ``<``, as ``<think>`` does: the turn still starts at the answer, trained whole,
    nothing reported dropped."""
    messages = [user("Write a div."), answer("<div>hi</div>")]
    tok, tokenized = encode(tokenizer, "deepseek-r1-distill", messages)
    assert "".join(trained_runs(tok, tokenized)) == "<div>hi</div>" + DS_EOS
    assert tokenized.dropped == ()


def test_deepseek_r1_keep_all_keeps_the_answer_text_intact(tokenizer):
    """As above with ``reasoning=keep_all``: the reasoning block goes before the answer,
    whose text is unchanged in the ids and trained whole."""
    messages = [user("Write a div."), answer("<div>hi</div>", reasoning="html")]
    tok, tokenized = encode(tokenizer, "deepseek-r1-distill", messages, reasoning="keep_all")
    assert "<div>hi</div>" in tok.decode(tokenized.input_ids)
    assert "".join(trained_runs(tok, tokenized)).endswith("<div>hi</div>" + DS_EOS)


@pytest.mark.parametrize("family", ["mistral-v0.3", "mistral-nemo"])
def test_mistral_system_prompt_and_tool_call_turn_is_not_rejected(tokenizer, family):
    """Mistral v0.3 / Nemo, a system prompt and a tool-call turn of empty content: the
    prompt renders differently in the whole (the system prompt is dropped there) and the turn
    has no content to search for; it is found after the generation prompt's ``[/INST]``,
    with the runs of the conversation without system prompt, and the drop counted."""
    chat = [user("Weather in Paris?"), answer("", tool_calls=[CALL]), tool_result("sunny")]
    chat.append(answer("It is sunny."))
    tok, bare = encode(tokenizer, family, chat, TOOLS)
    system = [{"role": "system", "content": "Be brief."}]
    _, with_system = encode(tokenizer, family, system + chat, TOOLS)
    assert trained_runs(tok, with_system) == trained_runs(tok, bare)
    assert "system prompt" in with_system.dropped


def test_gpt_oss_tool_call_with_reasoning_then_final_answer(tokenizer):
    """gpt-oss agent trace: a tool call with reasoning, its result, a final answer with
    reasoning. The whole rendering drops the call's analysis, the prefix renderings keep it.
    The call is trained through ``<|call|>`` (not through the tool result's header, which
    names the function again), the last turn with its analysis and final header, and only
    the first turn's reasoning is counted as dropped."""
    messages = [
        user("Weather in Paris?"),
        answer("", reasoning="I should call the tool", tool_calls=[CALL]),
        tool_result("sunny"),
        answer("It is sunny.", reasoning="report it"),
    ]
    tok, tokenized = encode(tokenizer, "gpt-oss", messages, TOOLS)
    assert trained_runs(tok, tokenized) == [
        GPT_OSS_CALL,
        "<|channel|>analysis<|message|>report it<|end|><|start|>assistant"
        + HARMONY_FINAL
        + "It is sunny.<|return|>",
    ]
    assert tokenized.unstopped == 0


def test_gpt_oss_last_tool_call_with_a_preamble_trains_the_call(tokenizer):
    """gpt-oss, a row ending with a tool call that has content, written as an analysis
    message before the call: the turn goes on past the analysis's ``<|end|>`` and ends with
    ``<|call|>``, what generation stops on; nothing dropped."""
    messages = [user("Weather in Paris?"), answer("Let me check.", tool_calls=[CALL])]
    tok, tokenized = encode(tokenizer, "gpt-oss", messages, TOOLS)
    assert trained_runs(tok, tokenized) == [
        "<|channel|>analysis<|message|>Let me check.<|end|><|start|>assistant" + GPT_OSS_CALL
    ]
    assert tokenized.dropped == ()


def test_glm_row_ending_with_a_tool_call_gets_a_stop_token(tokenizer):
    """GLM-4.5, a row ending with a tool call, after which the template writes nothing:
    the stop token is appended and trained; nothing counted unstopped."""
    messages = [user("Weather in Paris?"), answer("", tool_calls=[CALL])]
    tok, tokenized = encode(tokenizer, "glm-4.5", messages, TOOLS)
    runs = trained_runs(tok, tokenized)
    assert runs[-1].startswith("\n<think></think>\n" + GLM_CALL)
    assert runs[-1].endswith(FAMILIES["glm-4.5"].stop)
    assert tokenized.unstopped == 0


# ---------------------------------------------------------------------------------------------
# Reasoning put back (keep_all)


def test_keep_all_fills_glm_empty_think_block_of_an_earlier_tool_call(tokenizer):
    """GLM-4.5 with ``reasoning=keep_all``, an earlier tool-call turn (content "") with
    reasoning: the template's empty think block is filled, one block and not two."""
    messages = [
        user("Weather in Paris?"),
        answer("", reasoning="call the tool", tool_calls=[CALL]),
        tool_result("sunny"),
        answer("It is sunny.", reasoning="report"),
        user("Thanks."),
        answer("You are welcome.", reasoning="polite"),
    ]
    tok, tokenized = encode(tokenizer, "glm-4.5", messages, TOOLS, reasoning="keep_all")
    runs = trained_runs(tok, tokenized)
    assert runs[0] == "\n<think>call the tool</think>\n" + GLM_CALL + "<|observation|>"


def test_keep_all_gpt_oss_empty_answer_has_one_final_header(tokenizer):
    """gpt-oss with ``reasoning=keep_all``, an earlier turn with reasoning and an empty
    answer: one final header after the analysis, not two."""
    messages = [
        user("Think about it."),
        answer("", reasoning="just thinking"),
        user("And now?"),
        answer("ok", reasoning="fine"),
    ]
    tok, tokenized = encode(tokenizer, "gpt-oss", messages, reasoning="keep_all")
    first = trained_runs(tok, tokenized)[0]
    assert first == (
        "<|channel|>analysis<|message|>just thinking<|end|><|start|>assistant"
        + HARMONY_FINAL
        + "<|end|>"
    )


# ---------------------------------------------------------------------------------------------


def preference(tmp_path, template: str, rows: list, tokenizer) -> PreferenceDataModule:
    tok = save_chat_tokenizer(tokenizer, tmp_path / "tok", template)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(
        tokenizer=tok, train_files=str(path), val_split=0.0, cache_dir=None, max_length=128
    )
    dm.setup("fit")
    return dm


def test_preference_summary_counts_a_dropped_system_prompt(tokenizer, tmp_path):
    """Preference pairs under a template that drops their system prompt (Mistral v0.3 when
    the conversation ends with an answer): counted in the data summary, as for SFT."""
    prompt = [{"role": "system", "content": "Be brief."}, user("Say hi.")]
    rows = [{"prompt": prompt, "chosen": "hi", "rejected": "go away"}] * 3
    summary = preference(tmp_path, SYSTEM_ON_LAST_USER, rows, tokenizer).stats["train"]
    assert "system prompt the chat template dropped" in summary.summary("train")


def test_preference_response_does_not_train_the_tool_result_inside_it(tokenizer, tmp_path):
    """A chosen response of several messages (a tool-call turn, its result, the answer):
    only its assistant turns are trained, as in SFT labels; not the tool's output or the
    headers between the turns."""
    chosen = [
        {"role": "assistant", "content": "Let me look."},
        {"role": "tool", "content": "TOOL OUTPUT"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    rows = [{"prompt": "Weather in Paris?", "chosen": chosen, "rejected": "No idea."}] * 2
    dm = preference(tmp_path, CHATML, rows, tokenizer)
    row = dm.datasets["train"][0]
    trained = dm.tokenizer.decode([i for i in row["chosen_labels"] if i != -100])
    assert "TOOL OUTPUT" not in trained
    assert "<|im_start|>" not in trained
