"""Label masks under the chat templates of 18 model families (see ``tests/chat_families.py``).

For every family and conversation: the trained runs of both ``train_on`` modes, the ids (those
of ``apply_chat_template``), what the template drops, and the rows it rejects. The fixture's own
checks (the templates render every case, the expected runs are in the renderings, the tokens
are single tokens) need nothing from the project's encoder.
"""

from __future__ import annotations

from datetime import datetime

import jinja2
import pytest

from src.datamodules.chat import ChatEncoder
from src.datamodules.records import DataError
from tests.chat_families import (
    FAMILIES,
    PAIRS,
    REASONING,
    SYSTEM,
    TOOL_ANSWER,
    TOOL_QUESTION,
    USER,
    Family,
    build,
    conversation,
)
from tests.conftest import trained_runs

PAIR_IDS = [f"{name}-{case}" for name, case in PAIRS]


@pytest.fixture(scope="module")
def toks(tokenizer):
    return {name: build(family, tokenizer) for name, family in FAMILIES.items()}


def render(tok, messages, tools=None, **kwargs) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


def template_ids(tok, family: Family, messages, tools) -> list[int]:
    """The ids the encoder must give: those of ``apply_chat_template``, with one BOS before them
    where the tokenizer adds one and the template writes none, and the EOS after a last turn
    that the template closes with nothing (GLM-4.5): the only two allowed differences."""
    out = tok.apply_chat_template(messages, tools=tools, tokenize=True)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    if family.adds_bos:
        bos_id = tok.convert_tokens_to_ids(family.bos)
        if ids[:1] != [bos_id]:
            ids.insert(0, bos_id)
    if family.eos_after_last and messages[-1]["role"] == "assistant":
        ids.append(tok.convert_tokens_to_ids(family.eos))
    return ids


def left_out(tok, messages, tools) -> set[str]:
    """What of the conversation the rendering lacks, found from the template's output alone."""
    text = render(tok, messages, tools)
    dropped = set()
    if messages[0]["role"] == "system" and SYSTEM not in text:  # the cases' system prompt
        dropped.add("system prompt")
    if any(m.get("reasoning_content", "") not in text for m in messages):
        dropped.add("reasoning")
    if any("tool_calls" in m for m in messages):
        without = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        try:
            if render(tok, without, tools) == text:
                dropped.add("tool calls")
        except jinja2.TemplateError:  # the template needs them (gpt-oss names the tool)
            pass
    return dropped


# ---------------------------------------------------------------------------------------------
# The fixtures themselves (these run with any encoder)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_tokens_are_single_tokens(toks, name):
    tok, family = toks[name], FAMILIES[name]
    named = [t for t in (family.bos, family.eos, family.pad) if t]
    for token in (*named, *family.special, *family.added, *family.stop):
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(token)], token
    assert tok.eos_token == family.eos
    assert set(family.added).isdisjoint(tok.all_special_tokens)  # special=False, as the real
    first = tok("hi")["input_ids"][0]
    assert (first == tok.bos_token_id) == family.adds_bos


@pytest.mark.parametrize(("name", "case"), PAIRS, ids=PAIR_IDS)
def test_template_renders_every_case(toks, name, case):
    tok, family = toks[name], FAMILIES[name]
    messages, tools = conversation(family, case)
    expected = family.cases[case]
    if expected.error:
        with pytest.raises(jinja2.TemplateError, match=expected.error):
            render(tok, messages, tools)
        return
    text = render(tok, messages, tools)
    for i, message in enumerate(messages):  # every generation prompt renders too
        if message["role"] == "assistant":
            assert render(tok, messages[:i], tools, add_generation_prompt=True)
    # the expected runs are in the rendering, in order, and end where generation stops
    runs = list(expected.assistant)
    assert len(runs) == sum(m["role"] == "assistant" for m in messages)
    if family.eos_after_last:
        assert runs[-1].endswith(family.eos) and not text.endswith(family.eos)
        runs[-1] = runs[-1][: -len(family.eos)]
        assert text.endswith(runs[-1])
    cursor = 0
    for run in runs:
        at = text.find(run, cursor)
        assert at >= 0, run
        cursor = at + len(run)
    for run in expected.assistant:
        assert run.endswith(family.stop + family.closes), run
        for prompt_text in (SYSTEM, *USER, TOOL_QUESTION):
            assert prompt_text not in run
    assert expected.last_runs == expected.assistant[-1:]
    # what the template drops is what the expectation says
    assert left_out(tok, messages, tools) == set(expected.dropped)


def test_reasoning_case_carries_reasoning():
    messages, _ = conversation(FAMILIES["qwen3"], "reasoning")
    assert [m.get("reasoning_content") for m in messages if m["role"] == "assistant"] == list(
        REASONING
    )


@pytest.mark.parametrize("name", ["llama-3.1", "llama-3.2"])
def test_llama_date_lines(toks, name):
    tok = toks[name]
    messages, _ = conversation(FAMILIES[name], "single_turn")
    assert "Today Date: 01 Jan 2025\n" in render(tok, messages, date_string="01 Jan 2025")
    default = "26 Jul 2024" if name == "llama-3.1" else datetime.now().strftime("%d %b %Y")
    assert f"Cutting Knowledge Date: December 2023\nToday Date: {default}\n" in render(
        tok, messages
    )


def test_command_r7b_picks_tool_use_with_tools(toks):
    tok = toks["command-r7b"]
    family = FAMILIES["command-r7b"]
    tool_chat, tools = conversation(family, "tool_call")
    header = "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    for gen in (False, True):  # tool_use ignores add_generation_prompt
        text = render(tok, tool_chat, tools, add_generation_prompt=gen)
        assert "## Available Tools" in text and text.endswith("<|END_OF_TURN_TOKEN|>" + header)
    chat, _ = conversation(family, "no_system")
    assert render(tok, chat).endswith("<|END_RESPONSE|><|END_OF_TURN_TOKEN|>")
    assert render(tok, chat, add_generation_prompt=True).endswith(header + "<|START_RESPONSE|>")


def test_smollm3_generation_markers_cover_the_header(toks):
    """The {% generation %} markers span whole turns, header included: masks from them would
    train the generation prompt."""
    tok = toks["smollm3"]
    messages, _ = conversation(FAMILIES["smollm3"], "single_turn")
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(marked).startswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------
# The encoder's label masks


@pytest.mark.parametrize("train_on", ["assistant", "last_assistant"])
@pytest.mark.parametrize(("name", "case"), PAIRS, ids=PAIR_IDS)
def test_label_masks(toks, name, case, train_on):
    tok, family = toks[name], FAMILIES[name]
    messages, tools = conversation(family, case)
    expected = family.cases[case]
    encoder = ChatEncoder(tok, train_on=train_on, stop_tokens=list(family.stop))
    rows = [{"messages": messages, "tools": tools}]
    if expected.error:
        with pytest.raises(DataError, match=expected.error):
            encoder.encode(rows, ["row"])
        return
    tokenized = encoder.encode(rows, ["row"])[0]
    runs = expected.assistant if train_on == "assistant" else expected.last_runs
    assert trained_runs(tok, tokenized) == list(runs)
    if expected.ids:
        assert list(tokenized.input_ids) == template_ids(tok, family, messages, tools)
    assert sorted(tokenized.dropped) == sorted(expected.dropped)


def test_r1_tool_call_turn_with_empty_content_starts_after_the_header(tokenizer):
    """A later form of the R1 template renders tool calls for content "" too; its generation
    prompt opens ``<think>`` where the rendering has ``<｜tool▁calls▁begin｜>``, which shares its
    first character. The R1 template closes a single call with nothing, so that turn has no
    stop token (counted), and the tool output's header after it is never trained."""
    family = FAMILIES["deepseek-r1-distill"]
    template = family.template.replace(
        "message['content'] is none %}", "message['tool_calls'] %}"
    ).replace(
        "message['content'] is not none %}",
        "message['content'] is not none and not message['tool_calls'] %}",
    )
    tok = build(family, tokenizer)
    tok.chat_template = template
    messages, tools = conversation(family, "tool_call")
    tokenized = ChatEncoder(tok, stop_tokens=list(family.stop)).encode(
        [{"messages": messages, "tools": tools}], ["row"]
    )[0]
    call = (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>'
    )
    assert trained_runs(tok, tokenized) == [call, TOOL_ANSWER + "<｜end▁of▁sentence｜>"]
    assert tokenized.unstopped == 1
    assert list(tokenized.input_ids) == template_ids(tok, family, messages, tools)
