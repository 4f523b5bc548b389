# ruff: noqa: E501  (the templates keep the lines of the ones shipped with the models)
"""Label masks under real-world chat templates, and the built-in named templates.

The templates (Qwen2.5, Qwen3, Llama-3.1, Gemma-3 and Zephyr from ``tests/chat_families.py``;
Mistral, Mistral v0.3 and Phi-3 below) are written out by hand after the ones shipped with the
models: the same structure, injected text and special tokens. Their tokenizers wrap the committed tiny tokenizer's backend with the model's
special tokens added, so nothing is downloaded. A tokenizer whose real counterpart puts a BOS
before every text (Llama, Mistral, Gemma, Zephyr) gets a post-processor that does the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from src.datamodules.chat import (
    IGNORE_INDEX,
    ChatEncoder,
    ChatRenderer,
    encode_with_offsets,
    tokenize_conversation,
)
from src.datamodules.records import DataError
from src.datamodules.templates import BUILTIN_TEMPLATES
from src.datamodules.tokenizer import load_tokenizer
from tests.chat_families import GEMMA3 as GEMMA
from tests.chat_families import LLAMA31, QWEN3, QWEN25, ZEPHYR
from tests.conftest import ASSETS, trained_runs

# ---------------------------------------------------------------------------------------------
# More real-world chat templates, written out (the Jinja environment trims blocks, as the hub's do)

MISTRAL = r"""
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Mistral v0.3 (also Mixtral-8x22B, Mistral-Nemo): the system message goes into the LAST user
# turn, so the rendering of a conversation's prefix is not a prefix of the whole.
MISTRAL_V03 = r"""
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {{- tool | tojson }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
            {%- endfor %}
            {{- "][/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""


@dataclass(frozen=True)
class Spec:
    """A real-world template, its model's special tokens and how its assistant turns look."""

    template: str
    eos: str
    end: str  # what closes an assistant turn
    bos: str | None = None
    pad: str | None = None
    extra: tuple[str, ...] = ()
    adds_bos: bool = False  # the real tokenizer puts a BOS before every text by default
    lead: str = ""  # template text between the generation prompt and the content
    injected: tuple[str, ...] = ()  # text the template adds that no message holds
    default_system: str | None = None  # the system prompt it adds when there is none


SPECS = {
    "qwen2.5": Spec(
        QWEN25,
        eos="<|im_end|>",
        end="<|im_end|>",
        pad="<|endoftext|>",
        extra=("<|im_start|>", "<|im_end|>"),
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    "qwen3": Spec(
        QWEN3,
        eos="<|im_end|>",
        end="<|im_end|>",
        pad="<|endoftext|>",
        extra=("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    ),
    "llama-3.1": Spec(
        LLAMA31,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        end="<|eot_id|>",
        extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"),
        adds_bos=True,
        injected=("Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024",),
    ),
    "mistral": Spec(
        MISTRAL,
        bos="<s>",
        eos="</s>",
        end="</s>",
        extra=("[INST]", "[/INST]"),
        adds_bos=True,
        lead=" ",  # "[/INST] 42</s>": the model writes the space after [/INST]
    ),
    "gemma": Spec(
        GEMMA,
        bos="<bos>",
        eos="<eos>",
        end="<end_of_turn>",
        pad="<pad>",
        extra=("<start_of_turn>", "<end_of_turn>"),
        adds_bos=True,
    ),
    "phi-3": Spec(
        PHI3,
        eos="<|endoftext|>",
        end="<|end|>",
        pad="<|endoftext|>",
        extra=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        injected=("<|endoftext|>",),  # "{% else %}{{ eos_token }}": after the last turn
    ),
    "zephyr": Spec(
        ZEPHYR,
        bos="<s>",
        eos="</s>",
        end="</s>",
        extra=("<|system|>", "<|user|>", "<|assistant|>"),
        adds_bos=True,
    ),
}

SYSTEM = "Answer in as few words as possible."
USER = ("Reverse the words: red fox.", "Now uppercase it.")
ANSWERS = ("fox red", "FOX RED")


def chat(system: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for question, answer in zip(USER, ANSWERS, strict=True):
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    return messages


def build(tokenizer, spec: Spec, template: str | None = None) -> PreTrainedTokenizerFast:
    """The tiny tokenizer's backend with ``spec``'s special tokens and chat template."""
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    special: dict = {"eos_token": spec.eos, "additional_special_tokens": list(spec.extra)}
    if spec.bos:
        special["bos_token"] = spec.bos
    if spec.pad:
        special["pad_token"] = spec.pad
    tok.add_special_tokens(special)
    if spec.adds_bos:
        bos_id = tok.convert_tokens_to_ids(spec.bos)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, bos_id)],
        )
    tok.chat_template = spec.template if template is None else template
    return tok


@pytest.fixture(scope="module")
def toks(tokenizer) -> dict[str, PreTrainedTokenizerFast]:
    return {name: build(tokenizer, spec) for name, spec in SPECS.items()}


def expected_runs(name: str) -> list[str]:
    spec = SPECS[name]
    runs = [spec.lead + answer + spec.end for answer in ANSWERS]
    if name == "qwen3":  # the last turn (after the last user query) gets an empty think block
        runs[-1] = "<think>\n\n</think>\n\n" + runs[-1]
    return runs


# ---------------------------------------------------------------------------------------------
# Label masks


@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("name", list(SPECS))
def test_assistant_turns_and_their_end_are_all_that_is_trained(toks, name, system):
    tok, spec = toks[name], SPECS[name]
    tokenized = tokenize_conversation(tok, chat(system))
    runs = trained_runs(tok, tokenized)
    assert runs == expected_runs(name)
    text = tok.decode(tokenized.input_ids)
    system_text = SYSTEM if system else spec.default_system
    for prompt_text in (*USER, *spec.injected, *([system_text] if system_text else [])):
        assert prompt_text in text  # the prompt and injected text are there, never trained
        assert not any(prompt_text in run for run in runs)
    if spec.bos:
        bos_id = tok.convert_tokens_to_ids(spec.bos)
        assert tokenized.input_ids.count(bos_id) == 1
        assert tokenized.input_ids[0] == bos_id
        assert tokenized.labels[0] == IGNORE_INDEX
    # exactly the ids of the rendering (plus the BOS the tokenizer would add)
    rendered = tok.apply_chat_template(chat(system), tokenize=False)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert tokenized.input_ids[-len(ids) :] == ids


@pytest.mark.parametrize("name", list(SPECS))
def test_last_assistant_trains_only_the_final_turn(toks, name):
    tok = toks[name]
    tokenized = tokenize_conversation(tok, chat(), train_on="last_assistant")
    assert trained_runs(tok, tokenized) == expected_runs(name)[-1:]


@pytest.mark.parametrize("name", list(SPECS))
def test_all_trains_every_token_but_a_prepended_bos(toks, name):
    tok, spec = toks[name], SPECS[name]
    tokenized = tokenize_conversation(tok, chat(), train_on="all")
    text = tok.apply_chat_template(chat(), tokenize=False)
    prepended = spec.bos is not None and not text.startswith(spec.bos)
    assert prepended == (name == "zephyr")  # the only one whose template writes no BOS
    expected = list(tokenized.input_ids)
    if prepended:
        expected[0] = IGNORE_INDEX
    assert tokenized.labels == expected


def test_template_bos_is_not_doubled_by_a_bos_adding_tokenizer(toks):
    tok = toks["llama-3.1"]
    bos_id = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok("hi")["input_ids"][0] == bos_id  # the tokenizer adds one by default
    assert ChatEncoder(tok).bos_id == bos_id
    tokenized = tokenize_conversation(tok, chat())
    assert tokenized.input_ids.count(bos_id) == 1


def test_qwen25_injects_default_system_prompt_only_without_system_message(toks):
    tok = toks["qwen2.5"]
    default = SPECS["qwen2.5"].default_system
    assert default in ChatRenderer(tok)(chat(system=False))
    assert default not in ChatRenderer(tok)(chat(system=True))


def test_qwen3_reasoning_is_dropped_from_earlier_turns_and_trained_in_the_last(toks):
    tok = toks["qwen3"]
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER[0]},
        {"role": "assistant", "content": "<think>\nswap the two words\n</think>\n\nfox red"},
        {"role": "user", "content": USER[1]},
        {"role": "assistant", "content": "FOX RED", "reasoning_content": "upper case"},
    ]
    tokenized = tokenize_conversation(tok, messages)
    assert trained_runs(tok, tokenized) == [
        "fox red<|im_end|>",
        "<think>\nupper case\n</think>\n\nFOX RED<|im_end|>",
    ]
    assert "swap the two words" not in tok.decode(tokenized.input_ids)
    last = tokenize_conversation(tok, messages, train_on="last_assistant")
    assert trained_runs(tok, last) == ["<think>\nupper case\n</think>\n\nFOX RED<|im_end|>"]


@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
def test_mistral_v03_answers_echoed_in_the_prompt_are_not_trained(tokenizer, system):
    tok = build(tokenizer, SPECS["mistral"], MISTRAL_V03)
    messages = [{"role": "system", "content": "Label the sentiment."}] if system else []
    messages += [
        {"role": "user", "content": "positive or negative: I loved it."},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "positive or negative: I hated it."},
        {"role": "assistant", "content": "negative"},
    ]
    for k in range(1, len(messages) + 1):
        expected = tok.apply_chat_template(messages[:k], tokenize=False)
        assert ChatRenderer(tok)(messages[:k]) == expected
    if system:  # the prefix renderings hold the system message, the whole does not
        prompt = ChatRenderer(tok)(messages[:2], add_generation_prompt=True)
        assert not ChatRenderer(tok)(messages).startswith(prompt)
    tokenized = tokenize_conversation(tok, messages)
    assert trained_runs(tok, tokenized) == [" positive</s>", " negative</s>"]
    assert tokenized.input_ids.count(tok.convert_tokens_to_ids("<s>")) == 1
    last = tokenize_conversation(tok, messages, train_on="last_assistant")
    assert trained_runs(tok, last) == [" negative</s>"]


def test_phi3_trains_up_to_the_end_token_and_not_the_closing_eos(toks):
    """Inference stops at ``<|end|>``: the EOS the template writes after the last turn is
    never written by the model, so it is not trained."""
    tok = toks["phi-3"]
    messages = chat()[:3]
    tokenized = tokenize_conversation(tok, messages)
    assert tok.decode(tokenized.input_ids).endswith("fox red<|end|>\n<|endoftext|>")
    assert trained_runs(tok, tokenized) == ["fox red<|end|>"]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
]


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3"])
def test_tool_calls_are_trained_and_tool_results_are_not(toks, name):
    tok = toks[name]
    tokenized = ChatEncoder(tok).encode([{"messages": TOOL_CHAT, "tools": TOOLS}], ["row"])[0]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    last = "It is sunny.<|im_end|>"
    if name == "qwen3":  # after the last user query: the think block on the final turn
        last = "<think>\n\n</think>\n\n" + last
    assert trained_runs(tok, tokenized) == [call + "<|im_end|>", last]
    assert "# Tools" in tok.decode(tokenized.input_ids)


# ---------------------------------------------------------------------------------------------
# Direct rendering and offsets agree with the tokenizer


@pytest.mark.parametrize("name", list(SPECS))
def test_renderer_matches_apply_chat_template(toks, name):
    tok = toks[name]
    renderer = ChatRenderer(tok)
    for system in (True, False):
        messages = chat(system)
        for k in range(1, len(messages) + 1):  # every prefix, as the label spans render them
            if name == "gemma" and messages[k - 1]["role"] == "system":
                continue  # the Gemma template needs a turn after the system message
            for gen in (False, True):
                expected = tok.apply_chat_template(
                    messages[:k], tokenize=False, add_generation_prompt=gen
                )
                assert renderer(messages[:k], add_generation_prompt=gen) == expected


@pytest.mark.parametrize("name", list(SPECS))
def test_renderer_matches_apply_chat_template_on_null_fields(toks, name):
    """Rows read from Parquet carry every field of every message, None where it is unset."""
    tok = toks[name]
    messages = [{**m, "tool_calls": None, "reasoning_content": None} for m in chat()]
    for gen in (False, True):
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ChatRenderer(tok)(messages, add_generation_prompt=gen) == expected
    tokenized = tokenize_conversation(tok, messages)
    assert trained_runs(tok, tokenized) == expected_runs(name)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "thinking"])
def test_renderer_matches_apply_chat_template_on_reasoning_fields(toks, field):
    tok = toks["qwen3"]
    messages = chat()
    messages[-1] = {**messages[-1], field: "upper case"}
    expected = tok.apply_chat_template(messages, tokenize=False)
    assert ChatRenderer(tok)(messages) == expected


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "llama-3.1"])
def test_renderer_matches_apply_chat_template_with_tools(toks, name):
    tok = toks[name]
    messages = TOOL_CHAT if name != "llama-3.1" else TOOL_CHAT[:2]
    for gen in (False, True):
        expected = tok.apply_chat_template(
            messages, tools=TOOLS, tokenize=False, add_generation_prompt=gen
        )
        assert ChatRenderer(tok)(messages, add_generation_prompt=gen, tools=TOOLS) == expected


@pytest.mark.parametrize("name", list(SPECS))
def test_offsets_encoding_matches_the_tokenizer(toks, name):
    tok = toks[name]
    texts = [tok.apply_chat_template(chat(s), tokenize=False) for s in (True, False)]
    for text, (ids, offsets) in zip(texts, encode_with_offsets(tok, texts), strict=True):
        assert list(ids) == tok(text, add_special_tokens=False)["input_ids"]
        assert len(offsets) == len(ids)


# ---------------------------------------------------------------------------------------------
# Built-in named templates and template files

BUILTIN_RUNS = {
    "chatml": ["fox red<|im_end|>", "FOX RED<|im_end|>"],
    "llama-3": ["fox red<|eot_id|>", "FOX RED<|eot_id|>"],
    "mistral": [" fox red<|im_end|>", " FOX RED<|im_end|>"],
    "alpaca": ["fox red<|im_end|>", "FOX RED<|im_end|>"],
    "plain": ["fox red<|im_end|>", "FOX RED<|im_end|>"],
}


def test_builtin_names_are_the_template_files():
    assert sorted(BUILTIN_RUNS) == BUILTIN_TEMPLATES


@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("name", sorted(BUILTIN_RUNS))
def test_builtin_template_masks(name, system):
    tok = load_tokenizer(str(ASSETS), chat_template=name)
    tokenized = tokenize_conversation(tok, chat(system))
    runs = trained_runs(tok, tokenized)
    assert runs == BUILTIN_RUNS[name]
    for prompt_text in (*USER, *([SYSTEM] if system else [])):
        assert prompt_text in tok.decode(tokenized.input_ids)
        assert not any(prompt_text in run for run in runs)
    last = tokenize_conversation(tok, chat(system), train_on="last_assistant")
    assert trained_runs(tok, last) == BUILTIN_RUNS[name][-1:]
    everything = tokenize_conversation(tok, chat(system), train_on="all")
    assert everything.labels == everything.input_ids  # the tiny tokenizer has no BOS


def test_alpaca_uses_its_preamble_without_a_system_message():
    tok = load_tokenizer(str(ASSETS), chat_template="alpaca")
    preamble = "Below is an instruction that describes a task."
    assert ChatRenderer(tok)(chat(system=False)).startswith(preamble)
    with_system = ChatRenderer(tok)(chat(system=True))
    assert with_system.startswith(SYSTEM + "\n\n") and preamble not in with_system
    runs = trained_runs(tok, tokenize_conversation(tok, chat(system=False)))
    assert not any(preamble in run for run in runs)


def test_chat_template_from_a_jinja_file(tmp_path):
    path = tmp_path / "vicuna.jinja"
    path.write_text(
        "{%- for m in messages %}"
        "{%- if m['role'] == 'user' %}{{- 'USER: ' + m['content'] + '\\n' }}"
        "{%- elif m['role'] == 'assistant' %}{{- 'ASSISTANT: ' + m['content'] + eos_token + '\\n' }}"
        "{%- else %}{{- m['content'] + '\\n\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}",
        encoding="utf-8",
    )
    tok = load_tokenizer(str(ASSETS), chat_template=str(path))
    assert tok.chat_template == path.read_text(encoding="utf-8")
    tokenized = tokenize_conversation(tok, chat())
    # the generation prompt stops before the space, which the model writes
    assert trained_runs(tok, tokenized) == [" fox red<|im_end|>", " FOX RED<|im_end|>"]


def test_unknown_template_name_lists_the_builtin_names():
    with pytest.raises(DataError, match="unknown chat template 'vicuna'") as err:
        load_tokenizer(str(ASSETS), chat_template="vicuna")
    for name in BUILTIN_RUNS:
        assert name in str(err.value)


def test_tokenizer_without_chat_template_asks_for_data_chat_template(tokenizer):
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    bare.add_special_tokens({"eos_token": "<|im_end|>"})
    assert not bare.chat_template
    with pytest.raises(DataError, match="data.chat_template"):
        ChatEncoder(bare).encode([{"messages": chat()}], ["data.jsonl:1"])
