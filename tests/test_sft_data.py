"""The SFT data module: truncation and drop counts, validation split, collation."""

from __future__ import annotations

import pytest
import torch

from src.datamodules import DataError, SFTDataModule
from src.datamodules.collate import Collator
from tests.conftest import ASSETS, conversation, write_jsonl


def make_module(tmp_path, rows, **kwargs) -> SFTDataModule:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    kwargs.setdefault("val_split", 0.0)
    return SFTDataModule(tokenizer=str(ASSETS), train_files=str(path), **kwargs)


def test_truncation_and_drops_are_counted(tmp_path):
    long_prompt = " ".join(["apple"] * 60)
    rows = [
        conversation("What is 1 + 1?", "2"),  # fits
        conversation("Repeat: red", " ".join(["red"] * 40)),  # answer cut, still trained
        conversation(long_prompt, "done"),  # answer entirely cut: dropped
        {"messages": [{"role": "user", "content": "no answer"}]},  # nothing to train
    ]
    dm = make_module(tmp_path, rows, max_length=24)
    dm.setup("fit")
    stats = dm.stats["train"]
    assert (stats.rows, stats.examples, stats.truncated) == (4, 2, 2)
    assert sum(stats.dropped.values()) == 2
    assert all(len(ids) <= 24 for ids in dm.datasets["train"]["input_ids"])
    assert "4 rows -> 2 examples" in stats.summary("train")


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    rows = [conversation(f"What is {i} + 1?", str(i + 1)) for i in range(40)]
    first = make_module(tmp_path, rows, val_split=0.25, seed=7)
    again = make_module(tmp_path, rows, val_split=0.25, seed=7)
    other = make_module(tmp_path, rows, val_split=0.25, seed=8)
    for dm in (first, again, other):
        dm.setup("fit")
    assert len(first.datasets["val"]) == 10 and len(first.datasets["train"]) == 30
    val_ids = first.datasets["val"]["input_ids"]
    assert val_ids == again.datasets["val"]["input_ids"]
    assert val_ids != other.datasets["val"]["input_ids"]
    train_ids = {tuple(t) for t in first.datasets["train"]["input_ids"]}
    assert not {tuple(v) for v in val_ids} & train_ids


def test_empty_training_set_after_preparation_is_an_error(tmp_path):
    dm = make_module(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="no training examples left"):
        dm.setup("fit")


def test_sample_prompts_come_from_validation(tmp_path):
    rows = [conversation("Uppercase: red fox", "RED FOX", system="Be brief.")]
    val = write_jsonl(tmp_path / "val.jsonl", rows)
    dm = make_module(tmp_path, rows, val_files=str(val))
    dm.setup("fit")
    [(prompt, reference)] = dm.sample_prompts(3)
    assert [m["role"] for m in prompt] == ["system", "user"] and reference == "RED FOX"


def test_collator_pads_right_with_masks():
    collate = Collator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [8, 9, 10, 11, 12, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100, -100, -100, -100, -100],
        [-100, -100, 10, 11, 12, -100, -100, -100],
    ]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 5]
    assert batch["input_ids"].dtype == torch.long


def test_loader_batches_from_the_demo_data():
    dm = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files="data/demo/sft_train.jsonl",
        val_files="data/demo/sft_val.jsonl",
        max_length=128,
        batch_size=4,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["input_ids"].shape[0] == 4
    assert (batch["labels"] != -100).any(dim=1).all()
