"""The table of formats: what the data modules accept, detection order, adding a format."""

from __future__ import annotations

import itertools
import re

import pytest

from src.datamodules import (
    DataError,
    PreferenceDataModule,
    PretrainDataModule,
    SFTDataModule,
    formats,
)
from src.datamodules.formats import (
    FORMATS,
    Format,
    detect_format,
    format_names,
    to_chat,
    to_preference,
    to_sft_example,
    to_text,
)
from src.datamodules.records import Record
from tests.conftest import ASSETS, ROOT

READERS = {"chat": to_chat, "text": to_text, "preference": to_preference}
MODULES = (SFTDataModule, PretrainDataModule, PreferenceDataModule)


def rec(row, where="t.jsonl:1"):
    return Record(row, where)


def refusal(read, *args) -> str:
    """The message of the DataError that ``read(*args)`` raises."""
    with pytest.raises(DataError) as caught:
        read(*args)
    return str(caught.value)


def accepted_by(module) -> set[str]:
    """The `format` values a data module reads (an empty row is then refused for its fields)."""
    names = (*format_names(), "auto", "not_a_format")
    return {n for n in names if "cannot be used for" not in refusal(module, rec({}), n)}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------ (a) the choices


@pytest.fixture(scope="module")
def modules():
    return {cls: cls(tokenizer=str(ASSETS), cache_dir=None).to_example for cls in MODULES}


def test_the_data_modules_accept_exactly_the_tables_formats_and_auto(modules):
    accepted = {cls: accepted_by(to_example) for cls, to_example in modules.items()}
    assert accepted == {
        SFTDataModule: {*format_names("chat", "text"), "auto"},
        PretrainDataModule: {"text", "auto"},
        PreferenceDataModule: {"preference", "auto"},
    }
    assert set().union(*accepted.values()) == {f.name for f in FORMATS} | {"auto"}
    assert len({f.name for f in FORMATS}) == len(FORMATS)  # a name is one row


def test_an_unknown_format_is_refused_naming_the_tables_choices(modules):
    message = refusal(modules[SFTDataModule], rec({"text": "hi"}), "not_a_format")
    assert message == (
        "t.jsonl:1: format 'not_a_format' cannot be used for supervised fine-tuning (expected "
        "one of messages, sharegpt, alpaca, prompt_completion, hh_rlhf, text, or auto); set "
        "data.format or the source's format"
    )


def test_the_readme_lists_the_tables_formats_and_who_uses_them():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("**Formats**", 1)[1].split("\n\n", 2)[1]
    used_by = {}
    for line in table.splitlines()[2:]:
        name, _fields, users = (cell.strip() for cell in line.strip("|").split("|"))
        used_by.setdefault(re.match(r"`(\w+)`", name).group(1), set()).add(users)
    assert set(used_by) == set(format_names())
    objective = {"chat": "SFT", "text": "pretraining", "preference": "DPO"}
    for f in FORMATS:
        assert all(users.startswith(objective[f.shape]) for users in used_by[f.name]), f.name


# ------------------------------------------------------------------ (b) detection order


def test_a_row_of_two_formats_is_detected_as_the_earlier_row_of_the_table():
    detected = [f for f in FORMATS if f.detected]
    for first, second in itertools.combinations(detected, 2):
        row = dict.fromkeys((*second.fields, *first.fields), "x")
        if any(f.matches(row) for f in detected[: detected.index(first)]):
            continue  # an even earlier row claims it
        assert detect_format(row, "t.jsonl:1", format_names()) == first.name


def test_the_tables_order_decides_which_conversation_is_read(monkeypatch):
    row = {
        "messages": [user("from messages"), assistant("a")],
        "conversations": [{"from": "human", "value": "from conversations"}],
    }
    assert to_sft_example(rec(row))["messages"][0]["content"] == "from messages"
    monkeypatch.setattr(formats, "FORMATS", tuple(reversed(FORMATS)))
    assert to_sft_example(rec(row))["messages"][0]["content"] == "from conversations"


def test_a_format_used_only_when_named_is_never_detected():
    transcript = {"text": "\n\nHuman: hi\n\nAssistant: hello"}
    assert to_sft_example(rec(transcript)) == transcript  # a text row, trained as it is
    assert to_sft_example(rec(transcript), "hh_rlhf") == {
        "messages": [user("hi"), assistant("hello")]
    }
    named_only = [f.name for f in FORMATS if not f.detected]
    assert named_only == ["hh_rlhf"]
    assert all(detect_format(transcript, "w", (n, "text")) == "text" for n in named_only)


def test_a_preference_row_is_detected_before_its_conversation():
    row = {"messages": [user("q")], "chosen": "good", "rejected": "bad"}
    assert detect_format(row, "w", format_names()) == "preference"
    assert to_preference(rec(row)) == {
        "prompt": [user("q")],
        "chosen": [assistant("good")],
        "rejected": [assistant("bad")],
    }


# ------------------------------------------------------------------ (c) one function, one row


def read_qa(record: Record) -> list[dict]:
    return [user(record.row["question"]), assistant(record.row["answer"])]


def read_markdown(record: Record) -> str:
    return f"# {record.row['title']}\n\n{record.row['body']}"


QA = Format("qa", ("question", "answer"), "chat", read_qa)
MARKDOWN = Format("markdown", ("title", "body"), "text", read_markdown)


@pytest.fixture
def with_new_formats(monkeypatch):
    monkeypatch.setattr(formats, "FORMATS", (*FORMATS, QA, MARKDOWN))


@pytest.mark.usefixtures("with_new_formats")
def test_a_new_format_is_detected_and_read_by_every_reader_of_its_shape(modules):
    qa = rec({"question": "2+2?", "answer": "4", "tools": '[{"name": "add"}]'})
    example = modules[SFTDataModule](qa, "auto")
    assert example["messages"] == [user("2+2?"), assistant("4")]
    assert example["tools"][0]["function"]["name"] == "add"  # what every chat row gets
    assert to_chat(qa, "qa")["messages"] == example["messages"]

    page = rec({"title": "Cats", "body": "Cats purr."})
    assert modules[PretrainDataModule](page, "auto") == {"text": "# Cats\n\nCats purr."}
    assert modules[SFTDataModule](page, "markdown") == {"text": "# Cats\n\nCats purr."}


def test_a_new_format_gets_the_shared_checks_and_messages(monkeypatch, modules):
    wrong_role = Format("bot_qa", ("q",), "chat", lambda r: [{"role": "bot", "content": "x"}])
    monkeypatch.setattr(formats, "FORMATS", (*FORMATS, QA, MARKDOWN, wrong_role))
    assert refusal(to_chat, rec({"q": 1})) == (
        "t.jsonl:1: message 0 has unknown role 'bot' (expected one of system, user, "
        "assistant, tool)"
    )
    assert refusal(to_preference, rec({"question": "q"}), "qa") == (
        "t.jsonl:1: format 'qa' cannot be used for preference data (expected one of "
        "preference, or auto); set data.format or the source's format"
    )
    assert "(question, answer) or (title, body)" in refusal(to_sft_example, rec({}))
    assert refusal(modules[PretrainDataModule], rec({}), "qa") == (
        "t.jsonl:1: format 'qa' cannot be used for pretraining (expected one of text, "
        "markdown, or auto); set data.format or the source's format"
    )


def test_the_new_formats_are_gone_without_the_table_row():
    assert refusal(to_chat, rec({"question": "q", "answer": "a"}), "qa").startswith(
        "t.jsonl:1: format 'qa' cannot be used for chat data"
    )


# ------------------------------------------------------------------ (d) missing fields


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_each_formats_missing_fields_error_names_its_fields(fmt):
    read = READERS[fmt.shape]
    fields = ", ".join(fmt.fields)
    assert refusal(read, rec({}), fmt.name) == (
        f"t.jsonl:1: a {fmt.name!r} row needs the fields {fields}; missing {fields} "
        "(found no fields)"
    )
    first, *rest = fmt.fields
    if rest:
        assert refusal(read, rec({first: "x", "id": 1}), fmt.name) == (
            f"t.jsonl:1: a {fmt.name!r} row needs the fields {fields}; missing "
            f"{', '.join(rest)} (found {first}, id)"
        )
