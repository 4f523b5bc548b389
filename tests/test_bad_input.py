"""Bad input and edge cases end in a DataError naming the row, or in counted drops."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from src.datamodules import DataError, PreferenceDataModule, SFTDataModule
from src.datamodules.chat import ChatEncoder
from src.datamodules.formats import to_preference
from src.datamodules.records import Record
from src.datamodules.streaming import StreamingDataset
from tests.conftest import ASSETS, conversation, trained_runs, write_jsonl

ALTERNATING = (
    "{%- for m in messages %}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant') }}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_template_that_rejects_a_row_names_the_row(tmp_path):
    rows = [
        conversation("hi", "hello"),
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    template = tmp_path / "alternating.jinja"
    template.write_text(ALTERNATING, encoding="utf-8")
    dm = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files=str(path),
        chat_template=str(template),
        val_split=0,
        cache_dir=None,
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2: the chat template rejects this .*alternate"):
        dm.setup("fit")


def test_built_in_templates_accept_a_conversation_opening_with_the_assistant(tokenizer):
    from src.datamodules.tokenizer import load_tokenizer

    messages = [
        {"role": "assistant", "content": "Hello! Ask me anything."},
        {"role": "user", "content": "Count: a b"},
        {"role": "assistant", "content": "2"},
    ]
    for name in ("mistral", "alpaca", "chatml"):
        tok = load_tokenizer(str(ASSETS), chat_template=name)
        [encoded] = ChatEncoder(tok).encode([{"messages": messages}], ["row"])
        assert trained_runs(tok, encoded)[-1].startswith(("2", " 2")), name


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": "hi", "chosen": [], "rejected": "x"}, "chosen"),
        ({"prompt": "hi", "chosen": "y", "rejected": {"role": "assistant"}}, "rejected"),
        ({"prompt": 3, "chosen": "y", "rejected": "x"}, "prompt"),
    ],
)
def test_preference_sides_of_the_wrong_shape_name_the_row(row, field):
    with pytest.raises(DataError, match=rf"p\.jsonl:4: '{field}' must be a string or"):
        to_preference(Record(row, "p.jsonl:4"))


def test_columns_that_are_null_do_not_decide_the_format():
    from src.datamodules.formats import to_sft_example

    row = {"messages": None, "text": "plain text row"}  # Parquet fills absent columns with null
    assert to_sft_example(Record(row, "x.parquet row 0")) == {"text": "plain text row"}


def test_an_empty_training_set_is_an_error_on_a_cached_run_too(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])

    def fresh() -> SFTDataModule:
        return SFTDataModule(
            tokenizer=str(ASSETS), train_files=str(path), val_split=0, cache_dir=str(tmp_path)
        )

    for _ in range(2):  # the second run finds the cache entry and still stops
        dm = fresh()
        dm.prepare_data()
        with pytest.raises(DataError, match="no training examples left"):
            dm.setup("fit")


def test_truncated_preference_keeps_a_bos_the_template_writes(tokenizer):
    bos_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    bos_tok.add_special_tokens(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    )
    bos_tok.chat_template = "{{- bos_token }}" + tokenizer.chat_template
    dm = PreferenceDataModule(tokenizer=str(ASSETS), train_files="unused", max_length=32)
    dm.__dict__["tokenizer"] = bos_tok  # the cached property, replaced
    example = {
        "prompt": [{"role": "user", "content": " ".join(["word"] * 60)}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    columns, stats = dm.encode_chunk([example], ["row"])
    assert stats.truncated == 1
    for side in ("chosen", "rejected"):
        ids = columns[f"{side}_input_ids"][0]
        assert len(ids) <= 32 and ids[0] == bos_tok.bos_token_id
        assert ids.count(bos_tok.bos_token_id) == 1


def test_streamed_rows_are_split_evenly_across_ranks(tmp_path):
    rows = [conversation(f"What is {i} + 1?", str(i + 1)) for i in range(41)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files=str(path),
        streaming=True,
        val_split=6,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    shards = []
    for rank in range(2):
        data = StreamingDataset(dm, skip=6)
        data.rank, data.world_size = rank, 2
        shards.append([r["input_ids"] for r in data])
    assert len(shards[0]) == len(shards[1]) == 17  # 35 rows: the odd last one goes to no rank
    everything = [r["input_ids"] for r in StreamingDataset(dm, skip=6)]
    assert [r for pair in zip(*shards, strict=True) for r in pair] == everything[:34]


def test_a_stream_with_no_examples_left_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"}]}] * 3)
    dm = SFTDataModule(
        tokenizer=str(ASSETS), train_files=str(path), streaming=True, val_split=1, cache_dir=None
    )
    dm.setup("fit")
    with pytest.raises(DataError, match="the training stream holds no examples"):
        list(dm.datasets["train"])
