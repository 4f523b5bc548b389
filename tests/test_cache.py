"""Prepared data are cached by everything that changes them; a cached run does no processing."""

from __future__ import annotations

import pytest

from src.datamodules import DataError, SFTDataModule
from src.datamodules.streaming import StreamingDataset
from tests.conftest import ASSETS, conversation, write_jsonl


def rows(n: int, offset: int = 0) -> list[dict]:
    return [conversation(f"What is {i} + 1?", str(i + 1)) for i in range(offset, offset + n)]


def module(path, cache_dir, **kwargs) -> SFTDataModule:
    kwargs.setdefault("val_split", 0.1)
    return SFTDataModule(
        tokenizer=str(ASSETS), train_files=str(path), cache_dir=str(cache_dir), **kwargs
    )


def forbid_processing(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the data were processed again")

    monkeypatch.setattr(SFTDataModule, "encode_chunk", fail)


def test_second_run_loads_the_cache_without_processing(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", rows(50))
    first = module(path, tmp_path / "cache", max_length=64)
    first.prepare_data()  # rank 0 of each node, before setup on every rank
    first.setup("fit")
    forbid_processing(monkeypatch)
    second = module(path, tmp_path / "cache", max_length=64)
    second.setup("fit")  # another rank, or the next run of the same config
    assert second.cache_path == first.cache_path
    assert second.datasets["train"]["input_ids"] == first.datasets["train"]["input_ids"]
    assert second.stats == first.stats
    assert second.val_examples == first.val_examples
    assert second.sample_prompts(2) == first.sample_prompts(2)


def test_key_changes_with_contents_and_every_setting(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows(20))
    base = module(path, tmp_path / "cache").cache_path
    assert module(path, tmp_path / "cache").cache_path == base
    variants = [
        {"max_length": 77},
        {"packing": True},
        {"train_on": "all"},
        {"chat_template": "llama-3"},
        {"val_split": 0.2},
        {"seed": 1},
        {"format": "messages"},
    ]
    keys = {module(path, tmp_path / "cache", **v).cache_path for v in variants}
    assert base not in keys and len(keys) == len(variants)
    write_jsonl(path, rows(20, offset=1))  # same file, new contents
    assert module(path, tmp_path / "cache").cache_path != base


def test_cache_disabled_with_null(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows(10))
    dm = SFTDataModule(tokenizer=str(ASSETS), train_files=str(path), cache_dir=None)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_path is None and len(dm.datasets["train"]) == 10
    assert not (tmp_path / "cache").exists()


def test_num_proc_gives_the_same_rows(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows(2500))  # three chunks
    one = module(path, tmp_path / "a", num_proc=1, packing=True, max_length=128)
    two = module(path, tmp_path / "b", num_proc=2, packing=True, max_length=128)
    for dm in (one, two):
        dm.setup("fit")
    assert one.datasets["train"]["input_ids"] == two.datasets["train"]["input_ids"]
    assert one.stats == two.stats


def test_streaming_holds_out_the_head_and_resumes(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows(40))
    dm = module(path, tmp_path / "cache", streaming=True, val_split=5, batch_size=2)
    dm.setup("fit")
    train = dm.datasets["train"]
    assert isinstance(train, StreamingDataset)
    assert len(dm.datasets["val"]) == 5
    streamed = [r["input_ids"] for r in train]
    assert len(streamed) == 35
    eager = module(path, tmp_path / "eager", val_split=0)
    eager.setup("fit")
    all_rows = eager.datasets["train"]["input_ids"]
    assert all_rows[5:] == streamed and all_rows[:5] == dm.datasets["val"]["input_ids"]
    # a resumed stream starts after the rows already consumed
    it = iter(train)
    [next(it) for _ in range(7)]
    state = train.state_dict()
    fresh = StreamingDataset(dm, skip=5)
    fresh.load_state_dict(state)
    assert [r["input_ids"] for r in fresh] == streamed[7:]


def test_streaming_needs_a_count_for_validation(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows(5))
    with pytest.raises(DataError, match="give val_split as a number of examples"):
        module(path, tmp_path / "cache", streaming=True, val_split=0.1)
