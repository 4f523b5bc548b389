"""Warnings a user needs before training: many truncated examples (with the max_length that
would keep 99%), an empty validation split, empty assistant turns; and the first preparation
says it prepared, not that it loaded from the cache."""

from __future__ import annotations

import logging

import pytest

from src.datamodules import PretrainDataModule, SFTDataModule
from tests.conftest import ASSETS, conversation, write_jsonl


def sft(tmp_path, rows, **kwargs) -> SFTDataModule:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    kwargs.setdefault("cache_dir", None)
    return SFTDataModule(tokenizer=str(ASSETS), train_files=str(path), val_split=0.0, **kwargs)


def long_answer(words: int) -> dict:
    return conversation("Repeat red.", " ".join(["red"] * words))


def test_many_truncated_examples_warn_with_the_length_that_keeps_99_percent(tmp_path):
    rows = [long_answer(10) for _ in range(80)] + [long_answer(150) for _ in range(20)]
    wide = sft(tmp_path, rows, max_length=4096)
    wide.setup("fit")
    longest = max(len(row["input_ids"]) for row in wide.datasets["train"])
    dm = sft(tmp_path, rows, max_length=64)
    with pytest.warns(UserWarning, match="max_length") as caught:
        dm.setup("fit")
    (message,) = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert "train: 20 of 100 examples (20.0%) are longer than max_length 64" in message
    keep = int(message.rsplit("max_length ", 1)[1].split()[0])
    assert keep % 64 == 0 and keep - 64 < longest <= keep  # the bin that holds 99% of them


def test_a_few_truncated_examples_do_not_warn(tmp_path, recwarn):
    rows = [long_answer(10) for _ in range(99)] + [long_answer(150)]
    sft(tmp_path, rows, max_length=64).setup("fit")
    assert not [w for w in recwarn if "truncated" in str(w.message)]


def test_an_empty_validation_split_warns(tmp_path):
    corpus = tmp_path / "book.txt"
    corpus.write_text("One long document, a single row.\n\nIts second paragraph.\n")
    dm = PretrainDataModule(
        tokenizer=str(ASSETS), train_files=str(corpus), val_split=0.05, cache_dir=None
    )
    with pytest.warns(UserWarning, match="no validation examples \\(val_split 0.05 holds none"):
        dm.setup("fit")
    assert dm.stats["val"].examples == 0


def test_empty_assistant_turns_are_not_trained_and_counted(tmp_path, tokenizer):
    rows = [
        conversation("Say hi.", "", "Say yo.", "yo"),  # the empty turn is not trained
        conversation("Say nothing.", ""),  # nothing left to train: dropped
    ]
    dm = sft(tmp_path, rows)
    dm.setup("fit")
    stats = dm.stats["train"]
    assert stats.examples == 1
    assert stats.dropped == {"with no trained token (no assistant turn within max_length)": 1}
    assert stats.template == {"empty assistant turns, not trained": 2}
    trained = [i for i in dm.datasets["train"][0]["labels"] if i != -100]
    assert tokenizer.decode(trained) == "yo<|im_end|>"


def test_the_first_preparation_does_not_say_it_loaded_from_the_cache(tmp_path, caplog):
    rows = [conversation("Say hi.", "hi") for _ in range(4)]
    caplog.set_level(logging.INFO)
    first = sft(tmp_path, rows, cache_dir=str(tmp_path / "cache"))
    first.prepare_data()
    first.setup("fit")
    assert "prepared and cached in" in caplog.text
    assert "loaded from the cache" not in caplog.text
    caplog.clear()
    second = sft(tmp_path, rows, cache_dir=str(tmp_path / "cache"))
    second.prepare_data()
    second.setup("fit")
    assert "loaded from the cache" in caplog.text
