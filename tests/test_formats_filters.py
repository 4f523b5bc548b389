"""Formats to canonical examples, quality filters, validation splits, preference pairs."""

from __future__ import annotations

from collections import Counter

import pytest

from src.datamodules import DataError, Filters, PreferenceDataModule, SFTDataModule
from src.datamodules.chat import IGNORE_INDEX
from src.datamodules.filters import scrub
from src.datamodules.formats import to_chat, to_preference, to_sft_example, to_text
from src.datamodules.records import Record
from src.datamodules.splits import split_indices, validation_count
from tests.conftest import ASSETS, conversation, write_jsonl


def rec(row, where="d.jsonl:7"):
    return Record(row, where)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ================================================================== formats

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_messages_with_a_tool_turn_and_tools_passed_through():
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [
        {"role": "system", "content": "Use tools."},
        user("2+3?"),
        {"role": "assistant", "tool_calls": [call]},  # no content: a tool call is enough
        {"role": "tool", "content": "5", "name": "add"},
        assistant("5"),
    ]
    example = to_sft_example(rec({"messages": messages, "tools": TOOLS, "id": 3}))
    assert example == {"messages": messages, "tools": TOOLS}
    assert "tools" not in to_chat(rec({"messages": messages[:2] + messages[4:], "tools": []}))


def test_sharegpt_roles():
    row = {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Weather?"},
            {"from": "gpt", "value": "Checking."},
            {"from": "observation", "value": "sunny"},
            {"from": "GPT", "value": "Sunny."},
        ]
    }
    assert to_chat(rec(row)) == {
        "messages": [
            {"role": "system", "content": "Be kind."},
            user("Weather?"),
            assistant("Checking."),
            {"role": "tool", "content": "sunny"},
            assistant("Sunny."),
        ]
    }


def test_sharegpt_unknown_speaker_names_row_and_turn():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}
    with pytest.raises(DataError, match=r"d\.jsonl:7: turn 1 has unknown speaker 'bot' \(expected"):
        to_chat(rec(row))
    with pytest.raises(DataError, match=r"d\.jsonl:7: turn 0 must be an object with 'from'"):
        to_chat(rec({"conversations": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(DataError, match="'conversations' must be a list of turns"):
        to_chat(rec({"conversations": "hi"}))


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"instruction": "Translate.", "input": "", "output": "Done."},
            [user("Translate."), assistant("Done.")],
        ),
        (
            {"instruction": "Translate.", "input": "chat", "output": "cat"},
            [user("Translate.\n\nchat"), assistant("cat")],
        ),
        (
            {"instruction": "Count.", "output": 3, "system": "Terse."},
            [{"role": "system", "content": "Terse."}, user("Count."), assistant("3")],
        ),
    ],
    ids=["no_input", "input", "system"],
)
def test_alpaca(row, expected):
    assert to_sft_example(rec(row)) == {"messages": expected}


def test_prompt_completion_as_strings_and_message_lists():
    assert to_chat(rec({"prompt": "2+2?", "completion": "4"})) == {
        "messages": [user("2+2?"), assistant("4")]
    }
    prompt = [{"role": "system", "content": "Math."}, user("2+2?")]
    completion = [assistant("4"), user("and 3+3?"), assistant("6")]
    assert to_chat(rec({"prompt": prompt, "completion": completion}))["messages"] == (
        prompt + completion
    )


def test_text_rows():
    assert to_sft_example(rec({"text": "Once upon a time."})) == {"text": "Once upon a time."}
    assert to_text(rec({"text": "abc", "meta": 1})) == "abc"
    with pytest.raises(DataError, match=r"d\.jsonl:7: 'text' must be a string, found list"):
        to_sft_example(rec({"text": ["a", "b"]}), "text")
    with pytest.raises(DataError, match="'text' must be a string, found int"):
        to_text(rec({"text": 5}))
    with pytest.raises(DataError, match="format 'text' cannot be used for chat data"):
        to_chat(rec({"text": "x"}), "text")


def test_detection_prefers_the_richest_format():
    # a messages row that also has a text column is chat; preference rows are not SFT data
    row = {"messages": [user("q"), assistant("a")], "text": "q a"}
    assert "messages" in to_sft_example(rec(row))
    with pytest.raises(DataError, match=r"cannot tell the format.*\(messages\) or"):
        to_sft_example(rec({"chosen": "a", "rejected": "b"}))


def test_rows_missing_fields_name_the_row_and_the_expected_fields():
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:7: a 'prompt_completion' row needs the fields prompt, completion; "
        r"missing completion \(found prompt, answer\)",
    ):
        to_sft_example(rec({"prompt": "q", "answer": "a"}), "prompt_completion")
    with pytest.raises(DataError, match=r"a 'messages' row needs the fields messages; missing"):
        to_chat(rec({"messages": None}), "messages")  # present but null
    with pytest.raises(
        DataError,
        match=r"x\.csv:2: cannot tell the format of this row: expected the fields "
        r"\(chosen, rejected\); found \(prompt, chosen\)",
    ):
        to_preference(rec({"prompt": "q", "chosen": "a"}, "x.csv:2"))
    with pytest.raises(DataError, match=r"found \(no fields\)"):
        to_sft_example(rec({}))


# ------------------------------------------------------------------ preference rows


def test_preference_with_strings():
    example = to_preference(
        rec({"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"})
    )
    assert example == {
        "prompt": [user("Capital of France?")],
        "chosen": [assistant("Paris")],
        "rejected": [assistant("Rome")],
    }


def test_preference_with_message_lists_and_tools():
    prompt = [{"role": "system", "content": "Short."}, user("Hi")]
    row = {
        "prompt": prompt,
        "chosen": [assistant("Hello!")],
        "rejected": [assistant("Go away.")],
        "tools": TOOLS,
    }
    assert to_preference(rec(row)) == {
        "prompt": prompt,
        "chosen": [assistant("Hello!")],
        "rejected": [assistant("Go away.")],
        "tools": TOOLS,
    }


def test_preference_whole_conversations_share_their_prefix_as_prompt():
    shared = [{"role": "system", "content": "S"}, user("a"), assistant("b"), user("c")]
    row = {"chosen": shared + [assistant("good")], "rejected": shared + [assistant("bad")]}
    assert to_preference(rec(row)) == {
        "prompt": shared,
        "chosen": [assistant("good")],
        "rejected": [assistant("bad")],
    }
    # longer answers: the responses are everything after the shared prefix
    row = {
        "chosen": [user("q"), assistant("x"), user("more"), assistant("y")],
        "rejected": [user("q"), assistant("z")],
    }
    example = to_preference(rec(row))
    assert example["prompt"] == [user("q")]
    assert example["chosen"] == [assistant("x"), user("more"), assistant("y")]
    assert example["rejected"] == [assistant("z")]


def test_preference_response_must_start_with_assistant():
    row = {"prompt": "q", "chosen": [user("not an answer")], "rejected": "fine"}
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:7: the chosen response must start with an assistant message, "
        r"found 'user'",
    ):
        to_preference(rec(row))
    # whole conversations that share nothing leave no prompt
    row = {"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]}
    with pytest.raises(DataError, match=r"d\.jsonl:7 \(prompt\): empty conversation"):
        to_preference(rec(row))


# ================================================================== filters


def sft(tmp_path, rows, val_rows=None, **kwargs):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    if val_rows is not None:
        kwargs["val_files"] = str(write_jsonl(tmp_path / "val.jsonl", val_rows))
    kwargs.setdefault("val_split", 0)
    dm = SFTDataModule(tokenizer=str(ASSETS), train_files=str(train), cache_dir=None, **kwargs)
    dm.setup("fit")
    return dm


def decoded(dm, split="train"):
    return [dm.tokenizer.decode(ids) for ids in dm.datasets[split]["input_ids"]]


def test_dedup_drops_exact_duplicates_in_train_and_train_rows_from_validation(tmp_path):
    rows = [conversation("q1", "a1"), conversation("q2", "a2"), conversation("q1", "a1")]
    rows += [{"prompt": "q2", "completion": "a2"}]  # same example after conversion
    val = [conversation("q1", "a1"), conversation("v", "w"), conversation("v", "w")]
    dm = sft(tmp_path, rows, val, filters=Filters(dedup=True))
    train, val_stats = dm.stats["train"], dm.stats["val"]
    assert (train.rows, train.examples, train.dropped) == (4, 2, {"exact duplicates": 2})
    assert (val_stats.rows, val_stats.examples) == (3, 1)
    assert val_stats.dropped == {"exact duplicates": 2}
    assert dm.val_examples == [conversation("v", "w")]
    assert "dropped: 2 exact duplicates" in train.summary("train")

    kept = sft(tmp_path, rows, val)  # without dedup every row stays
    assert (kept.stats["train"].examples, kept.stats["val"].examples) == (4, 3)


PII_TEXT = (
    "Mail jane.doe+work@mail.example.org or call +1 415-555-0132, (415) 555-0132 "
    "or 020 7946 0958. Note 12 + 30 = 42, in 1999 and 2024, code 1234567."
)
PII_SCRUBBED = (
    "Mail <EMAIL> or call <PHONE>, <PHONE> "
    "or <PHONE>. Note 12 + 30 = 42, in 1999 and 2024, code 1234567."
)


def test_scrub_replaces_emails_and_phones_only():
    counts: dict[str, int] = {}
    assert scrub(PII_TEXT, counts) == PII_SCRUBBED
    assert counts == {"e-mail addresses": 1, "phone numbers": 3}
    harmless_texts = (
        "12 + 30 = 42",
        "born 1987",
        "pi is 3.14159",
        "id 1234567",
        "v1.2.3",
        "on 2024-01-15 10:30",
        "15.01.2024",
        "scores 41 39 12 48",
    )
    for harmless in harmless_texts:
        assert scrub(harmless, {}) == harmless
    nested = {"messages": [{"role": "user", "content": "me@x.io"}], "n": 3}
    assert scrub(nested, {}) == {"messages": [{"role": "user", "content": "<EMAIL>"}], "n": 3}


def test_scrub_pii_through_the_data_module_is_counted(tmp_path):
    rows = [conversation(PII_TEXT, "Reach me at a.b@c.de"), conversation("12 + 30 = ?", "42")]
    dm = sft(tmp_path, rows, filters=Filters(scrub_pii=True))
    assert dm.stats["train"].filtered == {
        "e-mail addresses scrubbed": 2,
        "phone numbers scrubbed": 3,
    }
    first, second = decoded(dm)
    assert PII_SCRUBBED in first and "Reach me at <EMAIL>" in first
    assert "@" not in first and "555" not in first
    assert "12 + 30 = ?" in second and second.endswith("42<|im_end|>\n")
    assert "filters: 2 e-mail addresses scrubbed, 3 phone numbers scrubbed" in dm.stats[
        "train"
    ].summary("train")


def test_min_and_max_tokens_drop_and_count(tmp_path, tokenizer):
    rows = [conversation("hi", "yo"), conversation("tell", " ".join(["word"] * 30))]
    rows += [conversation("mid question here", "mid answer")]
    rendered = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    short, long_, mid = lengths
    assert short < mid < long_
    dm = sft(tmp_path, rows, filters=Filters(min_tokens=short + 1, max_tokens=long_ - 1))
    stats = dm.stats["train"]
    assert stats.examples == 1 and stats.truncated == 0
    assert stats.dropped == {
        f"shorter than min_tokens={short + 1}": 1,
        f"longer than max_tokens={long_ - 1}": 1,
    }
    assert [len(ids) for ids in dm.datasets["train"]["input_ids"]] == [mid]


# ================================================================== splits


def test_split_fraction_versus_count():
    assert validation_count(100, 0.25) == 25 and validation_count(100, 10) == 10
    assert validation_count(100, 1) == 1 and validation_count(100, 0) == 0
    train, val = split_indices(100, 0.25, seed=0)
    assert (len(train), len(val)) == (75, 25)
    train, val = split_indices(100, 10, seed=0)
    assert (len(train), len(val)) == (90, 10)
    assert sorted(train + val) == list(range(100)) and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)


def test_split_is_seeded():
    assert split_indices(50, 0.2, seed=1) == split_indices(50, 0.2, seed=1)
    assert split_indices(50, 0.2, seed=1)[1] != split_indices(50, 0.2, seed=2)[1]


def test_stratified_split_keeps_each_groups_share():
    strata = ["big"] * 80 + ["small"] * 20
    for seed in range(5):
        train, val = split_indices(100, 10, seed, strata)
        assert Counter(strata[i] for i in val) == {"big": 8, "small": 2}
        assert len(train) == 90 and not set(train) & set(val)
    # a tiny group still gets its largest-remainder share
    strata = ["a"] * 45 + ["b"] * 45 + ["c"] * 10
    _, val = split_indices(100, 5, 0, strata)
    assert Counter(strata[i] for i in val) == {"a": 2, "b": 2, "c": 1}


def test_val_split_holding_out_everything_is_an_error():
    with pytest.raises(DataError, match="val_split=10 would hold out all 10 training examples"):
        split_indices(10, 10, 0)
    with pytest.raises(DataError, match="would hold out all"):
        split_indices(4, 0.9, 0)  # rounds to 4
    with pytest.raises(DataError, match="must not be negative"):
        split_indices(4, -0.5, 0)


def test_stratify_by_a_column_through_the_data_module(tmp_path):
    rows = [{**conversation(f"q{i}", f"a{i}"), "lang": "en" if i < 32 else "fr"} for i in range(40)]
    dm = sft(tmp_path, rows, val_split=0.25, stratify_by="lang")
    langs = Counter(
        "en" if int(m["messages"][0]["content"][1:]) < 32 else "fr" for m in dm.val_examples
    )
    assert langs == {"en": 8, "fr": 2}
    with pytest.raises(DataError, match=r"train\.jsonl:1: no column 'topic' to stratify"):
        sft(tmp_path, rows, val_split=0.25, stratify_by="topic")


def test_stratify_by_length_through_the_data_module(tmp_path):
    rows = [conversation("q", "x" * (i + 1)) for i in range(100)]
    dm = sft(tmp_path, rows, val_split=10, stratify_by="length", seed=3)
    held = sorted(len(e["messages"][1]["content"]) - 1 for e in dm.val_examples)
    assert [i // 10 for i in held] == list(range(10))  # one from every length decile
    assert len(dm.datasets["train"]) == 90 and dm.stats["val"].rows == 10


def test_no_training_examples_left_after_filtering(tmp_path):
    rows = [conversation("q", "a"), conversation("r", "b")]
    with pytest.raises(DataError, match="no training examples left after preparation"):
        sft(tmp_path, rows, filters=Filters(min_tokens=10_000))


# ================================================================== preference module


def preference_module(tmp_path, rows, **kwargs):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    kwargs.setdefault("val_split", 0)
    dm = PreferenceDataModule(
        tokenizer=str(ASSETS), train_files=str(path), cache_dir=None, **kwargs
    )
    dm.setup("fit")
    return dm


def test_chosen_and_rejected_share_exactly_the_prompt_tokens(tmp_path, tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, user("Capital of France?")]
    rows = [{"prompt": prompt, "chosen": "Paris.", "rejected": "It is Rome, I think."}]
    dm = preference_module(tmp_path, rows)
    row = dm.datasets["train"][0]
    rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for side, answer in (("chosen", "Paris."), ("rejected", "It is Rome, I think.")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert ids[:n] == prompt_ids
        assert labels[:n] == [IGNORE_INDEX] * n
        assert labels[n:] == ids[n:] and IGNORE_INDEX not in labels[n:]
        assert ids[-1] == end_of_turn
        assert tokenizer.decode(ids[n:]) == f"{answer}<|im_end|>"
    stats = dm.stats["train"]
    assert stats.examples == 1
    assert (
        stats.trained_tokens
        == len(row["chosen_input_ids"]) + len(row["rejected_input_ids"]) - 2 * n
    )


def test_long_pairs_keep_the_end_of_the_prompt_and_the_start_of_the_responses(tmp_path, tokenizer):
    question = " ".join(f"w{i}" for i in range(80))
    chosen = " ".join(["yes"] * 40)
    rejected = " ".join(["no"] * 30)
    rows = [
        {"prompt": question, "chosen": chosen, "rejected": rejected},
        {"prompt": "short", "chosen": "a", "rejected": "b"},
    ]
    dm = preference_module(tmp_path, rows, max_length=48, max_prompt_length=20)
    full_prompt = tokenizer(
        tokenizer.apply_chat_template([user(question)], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    assert len(full_prompt) > 48
    row = dm.datasets["train"][0]
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert len(ids) == 48
        kept_prompt = labels.count(IGNORE_INDEX)
        assert kept_prompt == 20 and ids[:20] == full_prompt[-20:]
        response = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert ids[20:] == response[:28]
    assert dm.stats["train"].truncated == 1 and dm.stats["train"].examples == 2
    short = dm.datasets["train"][1]
    assert tokenizer.decode(short["chosen_input_ids"]).startswith("<|im_start|>user\nshort")


def test_identical_chosen_and_rejected_are_dropped_and_counted(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
    ]
    dm = preference_module(tmp_path, rows)
    stats = dm.stats["train"]
    assert (stats.rows, stats.examples) == (2, 1)
    assert stats.dropped == {"with identical chosen and rejected responses": 1}
