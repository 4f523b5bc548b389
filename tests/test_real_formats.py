"""Rows in the shapes real datasets and peer tools use, written here by hand.

Tool calls as LLaMA-Factory's glaive set stores them (tools as a JSON string, ShareGPT
``function_call`` turns), Anthropic hh-rlhf transcripts, gzip-compressed files, LLaMA-Factory's
ShareGPT and alpaca ranking rows, content given as typed parts, JSON files holding their rows
under a key, and unpaired (KTO) rows that SFT must refuse.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from src.datamodules import DataError, PreferenceDataModule, SFTDataModule
from src.datamodules.chat import IGNORE_INDEX
from src.datamodules.formats import to_chat, to_preference, to_sft_example
from src.datamodules.records import Record, local_files, read_records
from tests.conftest import ASSETS, trained_runs, write_jsonl


def rec(row, where="d.jsonl:7"):
    return Record(row, where)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def sft(path, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(
        tokenizer=str(ASSETS), train_files=str(path), val_split=0.0, cache_dir=None, **kwargs
    )
    dm.setup("fit")
    return dm


def preference(path, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        tokenizer=str(ASSETS), train_files=str(path), val_split=0.0, cache_dir=None, **kwargs
    )
    dm.setup("fit")
    return dm


def trained(dm, i=0) -> list[str]:
    row = dm.datasets["train"][i]
    return trained_runs(dm.tokenizer, SimpleNamespace(**row))


def response(dm, side, i=0) -> str:
    """The trained part of one side of a preference pair, decoded."""
    row = dm.datasets["train"][i]
    pairs = zip(row[f"{side}_input_ids"], row[f"{side}_labels"], strict=True)
    return dm.tokenizer.decode([t for t, y in pairs if y != IGNORE_INDEX])


# ================================================================== tool calls

WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CLOCK = {"name": "get_time", "description": "Local time", "parameters": {"type": "object"}}
WEATHER_TOOL = {"type": "function", "function": WEATHER}


def glaive_row() -> dict:
    """A row as LLaMA-Factory's glaive_toolcall data stores it: JSON strings everywhere."""
    return {
        "conversations": [
            {"from": "human", "value": "What is the weather in Paris?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
            },
            {"from": "observation", "value": json.dumps({"temperature": 21, "sky": "clear"})},
            {"from": "gpt", "value": "It is clear and 21 degrees in Paris."},
        ],
        "tools": json.dumps([WEATHER]),
    }


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_glaive_tools_string_and_function_call_turns_become_openai_tool_calls():
    example = to_sft_example(rec(glaive_row()))
    assert example == {
        "messages": [
            user("What is the weather in Paris?"),
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("get_weather", {"city": "Paris"})],
            },
            {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'},
            assistant("It is clear and 21 degrees in Paris."),
        ],
        "tools": [WEATHER_TOOL],
    }


def test_glaive_rows_train_the_tool_call_and_the_answer(tmp_path):
    dm = sft(write_jsonl(tmp_path / "glaive.jsonl", [glaive_row()]))
    assert trained(dm) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>",
        "It is clear and 21 degrees in Paris.<|im_end|>",
    ]
    text = dm.tokenizer.decode(dm.datasets["train"][0]["input_ids"])
    # the template got a real list of tools, not a string it would print character by character
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text


def test_a_function_call_turn_may_hold_a_list_of_calls_and_ids():
    calls = [
        {"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "c1"},
        {"name": "get_time", "arguments": '{"tz": "CET"}'},  # a string: kept as given
    ]
    row = {
        "conversations": [
            {"from": "human", "value": "Weather and time in Oslo?"},
            {"from": "function_call", "value": json.dumps(calls)},
            {"from": "observation", "value": "rain"},
            {"from": "observation", "value": "09:00"},
            {"from": "gpt", "value": "Rain, and it is nine."},
        ],
        "tools": json.dumps([WEATHER, CLOCK]),
    }
    message = to_chat(rec(row))["messages"][1]
    assert message == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {**call("get_weather", {"city": "Oslo"}), "id": "c1"},
            call("get_time", '{"tz": "CET"}'),
        ],
    }


def test_openai_messages_keep_string_arguments_but_tools_strings_are_parsed():
    messages = [
        user("Weather in Rome?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("get_weather", '{"city": "Rome"}')],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "0"},
        assistant("Sunny."),
    ]
    example = to_chat(rec({"messages": messages, "tools": json.dumps([WEATHER_TOOL])}))
    assert example == {"messages": messages, "tools": [WEATHER_TOOL]}
    # bare function descriptions in a list are wrapped too; an empty JSON list is no tools
    assert to_chat(rec({"messages": messages, "tools": [WEATHER]}))["tools"] == [WEATHER_TOOL]
    assert "tools" not in to_chat(rec({"messages": messages, "tools": "[]"}))


def test_tools_on_preference_rows_are_parsed():
    row = {
        "prompt": "Weather?",
        "chosen": "Which city?",
        "rejected": "No.",
        "tools": json.dumps(WEATHER),
    }
    assert to_preference(rec(row))["tools"] == [WEATHER_TOOL]


def function_call_row(value):
    return {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "function_call", "value": value},
        ]
    }


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {**glaive_row(), "tools": '[{"name": "get_weather",'},
            r"d\.jsonl:7: 'tools' is not valid JSON \(Expecting",
        ),
        (
            {**glaive_row(), "tools": "42"},
            r"d\.jsonl:7: 'tools' must be a list of tool descriptions",
        ),
        (
            {**glaive_row(), "tools": '[{"description": "no name"}]'},
            r"d\.jsonl:7: tool 0 must be a function description with a 'name'.*keys description",
        ),
        (
            function_call_row('{"name": "get_weather", "arguments": {'),
            r"d\.jsonl:7: turn 1 \(function_call\): the value is not valid JSON",
        ),
        (
            function_call_row('{"name": "get_weather"}'),
            r"turn 1 \(function_call\): each call must be an object with a 'name' and 'arguments'",
        ),
        (
            function_call_row("[]"),
            r"turn 1 \(function_call\): expected one call or a list of calls",
        ),
    ],
    ids=["tools_json", "tools_shape", "tool_without_name", "call_json", "call_shape", "no_call"],
)
def test_tool_json_that_does_not_parse_or_fit_names_the_row(row, message):
    with pytest.raises(DataError, match=message):
        to_sft_example(rec(row))


# ================================================================== hh-rlhf transcripts

SHARED = (
    "\n\nHuman: What should I pack for a day hike?"
    "\n\nAssistant: Water, snacks, a map and a rain jacket."
    "\n\nHuman: And if it gets cold?"
)
HH_CHOSEN = (
    SHARED + "\n\nAssistant: Add a warm layer and a hat.\n\nA headlamp helps if you finish late."
)
HH_REJECTED = SHARED + "\n\nAssistant: Just stay home."
HH_PROMPT = [
    user("What should I pack for a day hike?"),
    assistant("Water, snacks, a map and a rain jacket."),
    user("And if it gets cold?"),
]


def test_hh_rlhf_pairs_become_prompt_and_final_answers():
    example = to_preference(rec({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}))
    assert example == {
        "prompt": HH_PROMPT,
        "chosen": [
            assistant("Add a warm layer and a hat.\n\nA headlamp helps if you finish late.")
        ],
        "rejected": [assistant("Just stay home.")],
    }


def test_hh_rlhf_file_trains_only_the_final_answers(tmp_path):
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
            "rejected": "\n\nHuman: Hi\n\nAssistant: What?",
        },
    ]
    dm = preference(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert dm.stats["train"].examples == 2
    assert response(dm, "chosen") == (
        "Add a warm layer and a hat.\n\nA headlamp helps if you finish late.<|im_end|>"
    )
    assert response(dm, "rejected", 1) == "What?<|im_end|>"
    prompt = dm.tokenizer.decode(dm.datasets["train"][0]["chosen_input_ids"])
    assert prompt.startswith("<|im_start|>user\nWhat should I pack for a day hike?<|im_end|>")
    assert "Human:" not in prompt and "Assistant:" not in prompt


def test_an_hh_prompt_ending_with_an_empty_assistant_turn_awaits_the_response():
    row = {"prompt": SHARED + "\n\nAssistant:", "chosen": "Add a layer.", "rejected": "Stay home."}
    assert to_preference(rec(row))["prompt"] == HH_PROMPT


def test_hh_pairs_that_share_no_start_say_what_a_prompt_needs():
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}
    with pytest.raises(
        DataError, match=r"d\.jsonl:7 \(prompt\): empty conversation: the row has no 'prompt'"
    ):
        to_preference(rec(row))
    with pytest.raises(DataError, match=r"share no leading turn"):
        to_preference(rec({"chosen": "plain good", "rejected": "plain bad"}))


def test_hh_text_stays_text_unless_the_format_is_named():
    assert to_sft_example(rec({"text": HH_CHOSEN})) == {"text": HH_CHOSEN}
    messages = to_sft_example(rec({"text": HH_REJECTED}), "hh_rlhf")["messages"]
    assert messages == [*HH_PROMPT, assistant("Just stay home.")]
    with pytest.raises(
        DataError, match=r"d\.jsonl:7: a 'hh_rlhf' row's text must be a Human/Assistant"
    ):
        to_sft_example(rec({"text": "Once upon a time."}), "hh_rlhf")
    with pytest.raises(DataError, match="format 'hh_rlhf' cannot be used for preference data"):
        to_preference(rec({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}), "hh_rlhf")


def test_sft_on_hh_pairs_says_how_to_train_the_chosen_conversations(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    with pytest.raises(
        DataError,
        match=r"hh\.jsonl:1: cannot tell the format.*PreferenceDataModule.*"
        r"columns: \{text: chosen\}",
    ):
        sft(path)
    dm = sft(path, columns={"text": "chosen"}, format="hh_rlhf")  # what the message proposes
    assert trained(dm) == [
        "Water, snacks, a map and a rain jacket.<|im_end|>",
        "Add a warm layer and a hat.\n\nA headlamp helps if you finish late.<|im_end|>",
    ]


# ================================================================== gzip

ROWS = [{"text": "first row"}, {"text": "second row"}]


def gzipped(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


def test_every_local_type_reads_the_same_gzipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    gzipped(tmp_path / "a.jsonl.gz", jsonl)
    gzipped(tmp_path / "b.json.gz", json.dumps({"data": ROWS}).encode())
    gzipped(tmp_path / "c.csv.gz", b"text\nfirst row\nsecond row\n")
    gzipped(tmp_path / "d.txt.gz", b"first row\n\nsecond row\n")
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buffer)
    gzipped(tmp_path / "e.parquet.gz", buffer.getvalue())
    gzipped(tmp_path / "notes.tar.gz", b"not data")  # not a type we read: left out of a directory
    for name in ("a.jsonl.gz", "b.json.gz", "c.csv.gz", "e.parquet.gz"):
        assert [r.row for r in read_records(str(tmp_path / name))] == ROWS, name
    paragraphs = read_records(str(tmp_path / "d.txt.gz"), text_unit="paragraph")
    assert [r.row for r in paragraphs] == ROWS
    records = read_records(str(tmp_path / "a.jsonl.gz"))
    assert records[1].where == f"{tmp_path / 'a.jsonl.gz'}:2"
    assert [p.name for p in local_files(str(tmp_path))] == [
        "a.jsonl.gz",
        "b.json.gz",
        "c.csv.gz",
        "d.txt.gz",
        "e.parquet.gz",
    ]


def test_a_gzipped_chat_file_trains(tmp_path):
    row = {"messages": [user("Say hi."), assistant("hi")]}
    path = gzipped(tmp_path / "chat.jsonl.gz", (json.dumps(row) + "\n").encode())
    assert trained(sft(path)) == ["hi<|im_end|>"]


def test_gzipped_files_name_the_file_and_line_of_a_problem(tmp_path):
    bad_json = gzipped(tmp_path / "bad.jsonl.gz", b'{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:3: malformed JSON"):
        read_records(str(bad_json))
    latin = gzipped(tmp_path / "latin.jsonl.gz", b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl\.gz:2: not valid UTF-8"):
        read_records(str(latin))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"text": "a"}\n' * 2000)[:-30])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: not a valid gzip file, or cut short"):
        read_records(str(cut))
    plain = tmp_path / "plain.json.gz"
    plain.write_text("[]", encoding="utf-8")  # named .gz, never compressed
    with pytest.raises(DataError, match=r"plain\.json\.gz: not a valid gzip file"):
        read_records(str(plain))
    with pytest.raises(DataError, match=r"data file not found: data\.jsonl\.gz"):
        read_records("data.jsonl.gz")  # a missing file, not a hub id
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"x\.tar\.gz: unsupported file type '\.tar\.gz'"):
        read_records(str(tmp_path / "x.tar.gz"))


# ================================================================== LLaMA-Factory ranking rows


def sharegpt_pair() -> dict:
    """A row of LLaMA-Factory's ShareGPT preference data (dpo_en_demo), with a system column."""
    return {
        "conversations": [
            {"from": "human", "value": "Name a prime number."},
            {"from": "gpt", "value": "Seven."},
            {"from": "human", "value": "Another one?"},
        ],
        "chosen": {"from": "gpt", "value": "Eleven."},
        "rejected": {"from": "gpt", "value": "Nine."},
        "system": "Answer in one word.",
    }


def test_llamafactory_sharegpt_pairs_are_preference_rows():
    assert to_preference(rec(sharegpt_pair())) == {
        "prompt": [
            {"role": "system", "content": "Answer in one word."},
            user("Name a prime number."),
            assistant("Seven."),
            user("Another one?"),
        ],
        "chosen": [assistant("Eleven.")],
        "rejected": [assistant("Nine.")],
    }
    # the same with OpenAI role/content tags
    row = {
        "messages": [user("Name a prime number.")],
        "chosen": assistant("Two."),
        "rejected": assistant("Four."),
    }
    assert to_preference(rec(row))["prompt"] == [user("Name a prime number.")]


def test_llamafactory_sharegpt_pairs_through_the_data_module(tmp_path):
    dm = preference(write_jsonl(tmp_path / "dpo_en.jsonl", [sharegpt_pair()]))
    assert (response(dm, "chosen"), response(dm, "rejected")) == (
        "Eleven.<|im_end|>",
        "Nine.<|im_end|>",
    )
    text = dm.tokenizer.decode(dm.datasets["train"][0]["chosen_input_ids"])
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")


def test_sft_refuses_llamafactory_pairs_and_says_what_to_do(tmp_path):
    with pytest.raises(
        DataError, match=r"d\.jsonl:7: this row holds chosen and rejected responses"
    ):
        to_sft_example(rec(sharegpt_pair()))
    path = write_jsonl(tmp_path / "dpo_en.jsonl", [sharegpt_pair()])
    with pytest.raises(DataError, match=r"dpo_en\.jsonl:1: .*PreferenceDataModule"):
        sft(path)


def ultrafeedback_row() -> dict:
    """UltraFeedback-binarized's shape: a prompt, and whole conversations beside it (the
    chosen one also as ``messages``, for its SFT splits)."""
    conversation = [user("Hi"), assistant("Hello!")]
    return {
        "prompt": "Hi",
        "chosen": conversation,
        "rejected": [user("Hi"), assistant("Bye.")],
        "messages": conversation,
        "score_chosen": 8.0,
    }


def test_conversations_that_end_with_an_answer_are_still_sft_data():
    row = ultrafeedback_row()
    assert to_sft_example(rec(row)) == {"messages": row["messages"]}


def test_chosen_and_rejected_that_repeat_their_prompt_keep_only_the_answers(tmp_path):
    assert to_preference(rec(ultrafeedback_row())) == {
        "prompt": [user("Hi")],
        "chosen": [assistant("Hello!")],
        "rejected": [assistant("Bye.")],
    }
    dm = preference(write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback_row()]))
    text = dm.tokenizer.decode(dm.datasets["train"][0]["chosen_input_ids"])
    assert text.count("Hi") == 1 and response(dm, "chosen") == "Hello!<|im_end|>"


def test_a_ranking_conversation_must_stop_before_the_answers():
    row = {**sharegpt_pair(), "conversations": sharegpt_pair()["conversations"][:2]}
    with pytest.raises(DataError, match=r"d\.jsonl:7: 'conversations' ends with an assistant turn"):
        to_preference(rec(row))


def test_llamafactory_alpaca_ranking_rows():
    row = {
        "instruction": "Translate to French.",
        "input": "cat",
        "chosen": "chat",
        "rejected": "chien",
    }
    assert to_preference(rec(row)) == {
        "prompt": [user("Translate to French.\n\ncat")],
        "chosen": [assistant("chat")],
        "rejected": [assistant("chien")],
    }


def test_llamafactory_alpaca_history_rounds_come_before_the_instruction():
    row = {
        "instruction": "And 3+3?",
        "output": "6",
        "history": [["2+2?", "4"], ["And 1+1?", "2"]],
        "system": "Answer with a number.",
    }
    assert to_sft_example(rec(row))["messages"] == [
        {"role": "system", "content": "Answer with a number."},
        user("2+2?"),
        assistant("4"),
        user("And 1+1?"),
        assistant("2"),
        user("And 3+3?"),
        assistant("6"),
    ]
    ranking = {
        "instruction": "And 3+3?",
        "history": [["2+2?", "4"]],
        "chosen": "6",
        "rejected": "7",
    }
    assert to_preference(rec(ranking))["prompt"] == [user("2+2?"), assistant("4"), user("And 3+3?")]
    with pytest.raises(
        DataError, match=r"d\.jsonl:7: 'history' must be a list of \[instruction, resp"
    ):
        to_sft_example(rec({**row, "history": ["2+2?", "4"]}))


def test_axolotl_input_output_segments_are_refused_with_a_way_out():
    row = {"segments": [{"text": "Q: hi\n", "label": False}, {"text": "A: hello", "label": True}]}
    with pytest.raises(
        DataError, match=r"d\.jsonl:7: cannot tell the format.*input_output\) are not"
    ):
        to_sft_example(rec(row))


# ================================================================== content parts


def test_text_parts_are_joined_into_string_content(tmp_path):
    openai = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Name a colour."},
                    {"type": "text", "text": "Just one."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        ]
    }
    v1 = {  # LLaMA-Factory v1 messages: the text under "value"
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "2+2?"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "4"}]},
        ]
    }
    assert to_sft_example(rec(openai))["messages"] == [
        {"role": "system", "content": "Be brief."},
        user("Name a colour.\nJust one."),
        assistant("Blue."),
    ]
    assert to_sft_example(rec(v1)) == {"messages": [user("2+2?"), assistant("4")]}
    dm = sft(write_jsonl(tmp_path / "parts.jsonl", [openai, v1]))
    assert (trained(dm, 0), trained(dm, 1)) == (["Blue.<|im_end|>"], ["4<|im_end|>"])


def test_text_parts_in_preference_rows():
    parts = [{"type": "text", "text": "Paris."}]
    row = {
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}],
        "chosen": [{"role": "assistant", "content": parts}],
        "rejected": "Rome.",
    }
    assert to_preference(rec(row)) == {
        "prompt": [user("Capital of France?")],
        "chosen": [assistant("Paris.")],
        "rejected": [assistant("Rome.")],
    }


def test_a_non_text_part_names_its_type_and_message():
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]},
            assistant("A cat."),
        ]
    }
    with pytest.raises(
        DataError, match=r"d\.jsonl:7: message 0: content part 1 is of type 'image_url', not text"
    ):
        to_sft_example(rec(row))
    row["messages"][0]["content"] = [{"text": "no type"}]
    with pytest.raises(
        DataError, match=r"message 0: content part 0 must be an object with a 'type'"
    ):
        to_sft_example(rec(row))
    audio = {
        "prompt": "Listen.",
        "chosen": [{"role": "assistant", "content": [{"type": "input_audio"}]}],
        "rejected": "No.",
    }
    with pytest.raises(
        DataError, match=r"d\.jsonl:7: message 0: content part 0 is of type 'input_audio'"
    ):
        to_preference(rec(audio))


# ================================================================== JSON objects holding rows


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("key", ["data", "train", "rows", "examples"])
def test_a_json_object_holding_its_rows_under_one_key(tmp_path, key):
    path = write_json(tmp_path / "d.json", {"version": "1.0", "tags": ["demo"], key: ROWS})
    records = read_records(path)
    assert [r.row for r in records] == ROWS
    assert records[1].where == f"{path} row 1"


def test_a_json_object_that_is_one_chat_row(tmp_path):
    row = {"messages": [user("q"), assistant("a")], "tools": [WEATHER_TOOL]}
    assert [r.row for r in read_records(write_json(tmp_path / "one.json", row))] == [row]


def test_a_json_object_with_several_or_no_lists_of_rows_is_an_error(tmp_path):
    several = write_json(tmp_path / "splits.json", {"train": ROWS, "test": ROWS[:1]})
    with pytest.raises(
        DataError,
        match=r"splits\.json: the object holds several lists of rows \('train', 'test'\); "
        r".*jq '\.train'",
    ):
        read_records(several)
    none = write_json(tmp_path / "row.json", {"text": "just one row"})
    with pytest.raises(
        DataError, match=r"row\.json: expected a list of rows, .*the keys 'text'.*one row\?"
    ):
        read_records(none)


# ================================================================== unpaired preference (KTO)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "Is the sky green?", "completion": "Yes, always.", "label": False}, "label"),
        ({"messages": [user("Is the sky blue?"), assistant("Yes.")], "kto_tag": True}, "kto_tag"),
    ],
    ids=["trl_unpaired", "llamafactory_kto_tag"],
)
def test_sft_refuses_unpaired_preference_rows(row, field):
    with pytest.raises(DataError) as err:
        to_sft_example(rec(row))
    message = str(err.value)
    assert message.startswith(f"d.jsonl:7: this row has a boolean '{field}'")
    assert "train KTO on them with src.datamodules.UnpairedPreferenceDataModule" in message
    assert f"select(.{field} == true) | del(.{field})" in message  # how to keep the good ones


def test_unpaired_rows_through_the_data_modules(tmp_path):
    rows = [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": "2+2?", "completion": "5", "label": False},
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError, match=r"kto\.jsonl:1: this row has a boolean 'label'"):
        sft(path)
    with pytest.raises(
        DataError, match=r"kto\.jsonl:1: cannot tell the format.*UnpairedPreferenceDataModule"
    ):
        preference(path)
    # a label that means something else is renamed away, as the message says
    dm = sft(path, columns={"tag": "label"})
    assert dm.stats["train"].examples == 2
