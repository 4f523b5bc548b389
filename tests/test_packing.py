"""Packing: bin filling, block cutting, packed collation, and no cross-document contamination."""

from __future__ import annotations

import json
import random
from itertools import accumulate

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from src.datamodules import SFTDataModule
from src.datamodules.chat import IGNORE_INDEX, ChatEncoder
from src.datamodules.collate import Collator
from src.datamodules.packing import best_fit_decreasing, cut_blocks, pack_rows
from src.datamodules.pretrain import PretrainDataModule
from src.modules.losses import token_cross_entropy
from tests.conftest import ASSETS, conversation, write_jsonl

# ------------------------------------------------------------------ best-fit-decreasing


def test_best_fit_decreasing_hand_examples():
    # longest first: 6 opens bin 0 (room 4), 5 opens bin 1 (room 5), 4 fills bin 0 exactly,
    # 3 goes to bin 1 (room 2), 2 fills bin 1 exactly
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    # 7 -> bin 0 (room 3), 5 -> bin 1 (room 5), 4 -> bin 1 (room 1); the 1 goes to the
    # tightest bin (bin 1), where first-fit would put it in bin 0
    assert best_fit_decreasing([7, 5, 4, 1], 10) == [[0], [1, 2, 3]]
    # ties: the earlier example is placed first, into the earlier bin
    assert best_fit_decreasing([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]
    assert best_fit_decreasing([10, 10], 10) == [[0], [1]]
    assert best_fit_decreasing([], 10) == []


def test_best_fit_decreasing_rejects_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="longer than the row length 8"):
        best_fit_decreasing([3, 9, 2], 8)


def test_best_fit_decreasing_places_everything_once_and_fills_rows():
    rng = random.Random(0)
    lengths = [rng.randint(20, 600) for _ in range(3000)]
    capacity = 2048
    bins = best_fit_decreasing(lengths, capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(b and sum(lengths[i] for i in b) <= capacity for b in bins)
    fill = sum(lengths) / (len(bins) * capacity)
    assert fill >= 0.98, fill
    assert best_fit_decreasing(list(lengths), capacity) == bins  # deterministic


def test_pack_rows_keeps_examples_whole():
    ids = [[1] * 6, [2] * 5, [3] * 4, [4] * 3, [5] * 2]
    labels = [[-x for x in row] for row in ids]
    rows = pack_rows(ids, labels, 10)
    assert rows["input_ids"] == [[1] * 6 + [3] * 4, [2] * 5 + [4] * 3 + [5] * 2]
    assert rows["labels"] == [[-1] * 6 + [-3] * 4, [-2] * 5 + [-4] * 3 + [-5] * 2]
    assert rows["seq_lengths"] == [[6, 4], [5, 3, 2]]


# ------------------------------------------------------------------------- cut_blocks


def test_cut_blocks_hand_example():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    isolated = cut_blocks(docs, 4, isolate=True)
    assert isolated["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    # block 0: doc 0 whole + first token of doc 1; block 1: rest of doc 1 + 3 of doc 2
    assert isolated["seq_lengths"] == [[3, 1], [1, 3], [1]]
    plain = cut_blocks(docs, 4, isolate=False)
    assert plain == {"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8], [9]]}
    # documents ending exactly at block ends
    aligned = cut_blocks([[1, 2], [3, 4], [5]], 2, isolate=True)
    assert aligned == {"input_ids": [[1, 2], [3, 4], [5]], "seq_lengths": [[2], [2], [1]]}
    assert cut_blocks([], 4, isolate=True) == {"input_ids": []}


@pytest.mark.parametrize("block_size", [1, 7, 64, 1000])
def test_cut_blocks_loses_no_token(block_size):
    rng = random.Random(block_size)
    docs = [[rng.randrange(1000) for _ in range(rng.randint(1, 40))] for _ in range(30)]
    blocks = cut_blocks(docs, block_size, isolate=True)
    flat = [t for d in docs for t in d]
    assert [t for b in blocks["input_ids"] for t in b] == flat
    assert all(len(b) == block_size for b in blocks["input_ids"][:-1])
    assert 0 < len(blocks["input_ids"][-1]) <= block_size
    for ids, pieces in zip(blocks["input_ids"], blocks["seq_lengths"], strict=True):
        assert sum(pieces) == len(ids) and all(p > 0 for p in pieces)
    # the pieces are cut exactly at document ends and block ends
    piece_ends = set(accumulate(p for row in blocks["seq_lengths"] for p in row))
    doc_ends = set(accumulate(map(len, docs)))
    block_ends = set(range(block_size, len(flat), block_size)) | {len(flat)}
    assert piece_ends == doc_ends | block_ends


# --------------------------------------------------------------------------- Collator


def _doc_starts(seq_lengths: list[int], width: int) -> list[int]:
    """Start of every document of a packed row, and of its padding tail."""
    starts = [0, *accumulate(seq_lengths)]
    return starts if starts[-1] < width else starts[:-1]


def test_collator_hand_example_of_packed_rows():
    rows = [
        {
            "input_ids": [11, 12, 13, 14, 15],
            "labels": [-100, 12, 13, 14, 15],
            "seq_lengths": [2, 3],
        },
        {"input_ids": [21, 22, 23], "labels": [21, 22, 23], "seq_lengths": [3]},
    ]
    batch = Collator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 14, 15, 0, 0, 0],
        [21, 22, 23, 0, 0, 0, 0, 0],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [
        [-100, 12, -100, 14, 15, -100, -100, -100],
        [-100, 22, 23, -100, -100, -100, -100, -100],
    ]
    assert (batch["real_tokens"].item(), batch["token_slots"].item()) == (8, 16)

    flat = Collator(pad_token_id=0, padding_free=True)(rows)
    assert flat["input_ids"].tolist() == [[11, 12, 13, 14, 15, 21, 22, 23]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]
    assert flat["labels"].tolist() == [[-100, 12, -100, 14, 15, -100, 22, 23]]
    assert "attention_mask" not in flat and flat["real_tokens"].item() == 8
    assert flat["token_slots"].item() == 8


def test_collator_positions_restart_for_every_document():
    rng = random.Random(1)
    docs = [[rng.randrange(3, 100) for _ in range(rng.randint(1, 12))] for _ in range(20)]
    labels = [[t if rng.random() < 0.7 else IGNORE_INDEX for t in d] for d in docs]
    packed = pack_rows(docs, labels, 24)
    rows = [dict(zip(packed, values, strict=True)) for values in zip(*packed.values(), strict=True)]
    for padding_free in (False, True):
        batch = Collator(pad_token_id=0, pad_to_multiple_of=8, padding_free=padding_free)(rows)
        assert "attention_mask" not in batch
        width = batch["input_ids"].shape[1]
        assert width % 8 == 0
        if padding_free:
            assert batch["input_ids"].shape[0] == 1
            rows_seen = [
                {
                    "input_ids": [t for r in rows for t in r["input_ids"]],
                    "labels": [t for r in rows for t in r["labels"]],
                    "seq_lengths": [n for r in rows for n in r["seq_lengths"]],
                }
            ]
        else:
            assert batch["input_ids"].shape[0] == len(rows)
            rows_seen = rows
        assert batch["real_tokens"].item() == sum(len(r) for r in packed["input_ids"])
        for i, row in enumerate(rows_seen):
            n = len(row["input_ids"])
            starts = _doc_starts(row["seq_lengths"], width)
            expected_pos = []
            for a, b in zip(starts, [*starts[1:], width], strict=True):
                expected_pos += list(range(b - a))
            assert batch["position_ids"][i].tolist() == expected_pos
            expected_labels = list(row["labels"]) + [IGNORE_INDEX] * (width - n)
            for s in starts:
                expected_labels[s] = IGNORE_INDEX
            assert batch["labels"][i].tolist() == expected_labels
            assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
            assert (batch["input_ids"][i, n:] == 0).all()


def test_collator_unpacked_rows_get_an_attention_mask():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}]
    batch = Collator(pad_token_id=0)(rows)
    assert "position_ids" not in batch
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert (batch["real_tokens"].item(), batch["token_slots"].item()) == (5, 6)


# ------------------------------------------------------- packed forward == separate forwards

CONVERSATIONS = [
    conversation("What is 2 + 3?", "5"),
    conversation("Name a colour.", "Red, like a fox.", system="Be brief."),
    conversation("Repeat: red", " ".join(["red"] * 12)),
    conversation("Hi", "Hello!", "Count to three.", "one two three"),
]


@pytest.fixture(scope="module")
def documents(tokenizer):
    encoded = ChatEncoder(tokenizer).encode(CONVERSATIONS, [str(i) for i in range(4)])
    lengths = [len(d.input_ids) for d in encoded]
    assert len(set(lengths)) == len(lengths)  # different lengths
    return [(d.input_ids, d.labels) for d in encoded]


def _micro_model(model_dir, impl: str):
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32)
    return model.eval()


def _packed_batch(tokenizer, documents):
    """Two packed rows: all the documents, and the second one alone (a long padding tail)."""
    rows = [
        {
            "input_ids": [t for ids, _ in documents for t in ids],
            "labels": [t for _, labels in documents for t in labels],
            "seq_lengths": [len(ids) for ids, _ in documents],
        },
        {
            "input_ids": documents[1][0],
            "labels": documents[1][1],
            "seq_lengths": [len(documents[1][0])],
        },
    ]
    batch = Collator(tokenizer.pad_token_id, pad_to_multiple_of=16)(rows)
    assert batch["input_ids"].shape[1] > len(rows[0]["input_ids"])  # row 0 has a tail too
    return batch


def _alone(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logits_equal_separate_logits(impl, micro_model_dir, tokenizer, documents):
    model = _micro_model(micro_model_dir, impl)
    batch = _packed_batch(tokenizer, documents)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        alone = [_alone(model, ids) for ids, _ in documents]
        start = 0
        for (ids, _), logits in zip(documents, alone, strict=True):
            torch.testing.assert_close(
                packed[0, start : start + len(ids)], logits, atol=1e-5, rtol=1e-5
            )
            start += len(ids)
        torch.testing.assert_close(packed[1, : len(documents[1][0])], alone[1], atol=1e-5, rtol=0)

        # negative controls: the comparison above can fail
        second = slice(len(documents[0][0]), len(documents[0][0]) + len(documents[1][0]))
        unpositioned = model(input_ids=batch["input_ids"], use_cache=False).logits
        assert (unpositioned[0, second] - alone[1]).abs().max() > 1e-3
        # an all-ones attention mask turns off transformers' packed-sequence detection:
        # positions restart but the second document attends to the first
        masked = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            use_cache=False,
        ).logits
        assert (masked[0, second] - alone[1]).abs().max() > 1e-3


def test_packed_loss_is_the_token_weighted_mean(micro_model_dir, tokenizer, documents):
    model = _micro_model(micro_model_dir, "sdpa")
    batch = _packed_batch(tokenizer, documents)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"][:1],
            position_ids=batch["position_ids"][:1],
            use_cache=False,
        ).logits
        loss_sum, count, correct = token_cross_entropy(packed, batch["labels"][:1])
        per_doc = [
            token_cross_entropy(_alone(model, ids)[None], torch.tensor([labels]))
            for ids, labels in documents
        ]
    counts = [int(n) for _, n, _ in per_doc]
    assert len(set(counts)) > 1  # documents with different numbers of label tokens
    assert int(count) == sum(counts)
    assert int(correct) == sum(int(c) for _, _, c in per_doc)
    weighted = sum(s for s, _, _ in per_doc) / sum(counts)
    packed_mean = loss_sum / count
    torch.testing.assert_close(packed_mean, weighted, atol=1e-5, rtol=0)
    mean_of_means = sum(s / n for s, n, _ in per_doc) / len(per_doc)
    assert (packed_mean - mean_of_means).abs() > 1e-3


# --------------------------------------------------------------- through the data modules


def _sft_module(tmp_path, rows, **kwargs) -> SFTDataModule:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    return SFTDataModule(
        tokenizer=str(ASSETS), train_files=str(path), val_split=0, cache_dir=None, **kwargs
    )


def _split_rows(input_ids, seq_lengths):
    docs = []
    for ids, lengths in zip(input_ids, seq_lengths, strict=True):
        starts = [0, *accumulate(lengths)]
        docs += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
    return docs


def test_sft_module_packs_whole_examples(tmp_path):
    rows = [
        conversation(f"Question {i}: repeat red", " ".join(["red"] * (i % 9 + 1)))
        for i in range(24)
    ]
    packed_dm = _sft_module(tmp_path, rows, packing=True, max_length=64)
    plain_dm = _sft_module(tmp_path, rows, packing=False, max_length=64)
    packed_dm.setup("fit")
    plain_dm.setup("fit")
    stats = packed_dm.stats["train"]
    train = packed_dm.datasets["train"]
    assert stats.examples == 24 and stats.truncated == 0
    assert stats.packed_rows == len(train) < stats.examples
    assert 0 < stats.packing_efficiency <= 1
    assert stats.packed_rows >= -(-stats.tokens // 64)
    assert all(len(ids) <= 64 for ids in train["input_ids"])
    assert sum(len(ids) for ids in train["input_ids"]) == stats.tokens
    for ids, labels, lengths in zip(
        train["input_ids"], train["labels"], train["seq_lengths"], strict=True
    ):
        assert sum(lengths) == len(ids) == len(labels)
        assert all(0 < n <= 64 for n in lengths)
    # the packed rows hold exactly the unpacked examples, none split
    docs = _split_rows(train["input_ids"], train["seq_lengths"])
    assert sorted(docs) == sorted(tuple(ids) for ids in plain_dm.datasets["train"]["input_ids"])

    batch = next(iter(packed_dm.train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch


def test_split_long_packs_the_pieces_of_a_long_conversation(tmp_path, tokenizer):
    long = conversation("Repeat: red", " ".join(["red"] * 50))
    [full] = ChatEncoder(tokenizer).encode([long], ["long"])
    assert 64 * 1.5 < len(full.input_ids) < 64 * 2  # two pieces, both with trained tokens
    split = _sft_module(tmp_path, [long], packing=True, split_long=True, max_length=64)
    cut = _sft_module(tmp_path, [long], packing=True, max_length=64)
    split.setup("fit")
    cut.setup("fit")
    assert (cut.stats["train"].truncated, cut.stats["train"].examples) == (1, 1)
    # split, nothing is lost: counted as split, not truncated
    assert (split.stats["train"].truncated, split.stats["train"].examples) == (0, 1)
    assert split.stats["train"].filtered == {"long examples split into pieces": 1}
    split_rows = split.datasets["train"]
    assert split_rows["seq_lengths"] == [[64], [len(full.input_ids) - 64]]
    assert [t for ids in split_rows["input_ids"] for t in ids] == full.input_ids
    assert [t for lab in split_rows["labels"] for t in lab] == full.labels
    assert split.stats["train"].tokens == len(full.input_ids)
    assert cut.datasets["train"]["input_ids"] == [full.input_ids[:64]]
    assert cut.stats["train"].tokens == 64


@pytest.fixture
def text_file(tmp_path):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    rows = [{"text": " ".join(words[: 1 + i % len(words)])} for i in range(12)]
    return write_jsonl(tmp_path / "text.jsonl", rows)


def _pretrain_batch(text_file, isolate: bool):
    dm = PretrainDataModule(
        tokenizer=str(ASSETS),
        train_files=str(text_file),
        val_split=0,
        cache_dir=None,
        max_length=16,
        isolate_documents=isolate,
    )
    dm.setup("fit")
    train = dm.datasets["train"]
    return dm, train, dm.collator()([train[i] for i in range(len(train))])


def test_pretrain_isolated_documents_restart_positions(text_file, tokenizer):
    dm, train, batch = _pretrain_batch(text_file, isolate=True)
    eos = tokenizer.eos_token_id
    assert "attention_mask" not in batch and len(train) > 2
    ids, positions, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    for i, row in enumerate(train):
        n = len(row["input_ids"])
        assert sum(row["seq_lengths"]) == n
        for t in range(ids.shape[1]):
            # a document starts at the row start, after an EOS, and at the padding tail
            restart = t == 0 or t == n or (t < n and ids[i, t - 1].item() == eos)
            if restart:
                assert positions[i, t].item() == 0 and labels[i, t].item() == IGNORE_INDEX
            else:
                assert positions[i, t].item() == positions[i, t - 1].item() + 1
                if t < n:
                    assert labels[i, t].item() == ids[i, t].item()
    texts = [json.loads(line)["text"] for line in text_file.read_text().splitlines()]
    docs = dm.encoder.encode_documents(texts)
    assert [t for r in train for t in r["input_ids"]] == [t for d in docs for t in d]
    assert dm.stats["train"].tokens == sum(map(len, docs))


def test_pretrain_plain_concatenation_trains_on_every_token(text_file, tokenizer):
    _, train, batch = _pretrain_batch(text_file, isolate=False)
    assert "position_ids" not in batch and "seq_lengths" not in train.column_names
    mask = batch["attention_mask"].bool()
    assert mask.sum().item() == batch["real_tokens"].item()
    assert mask.sum(dim=1).tolist() == [len(r["input_ids"]) for r in train]
    expected = torch.where(mask, batch["input_ids"], IGNORE_INDEX)
    assert torch.equal(batch["labels"], expected)
    assert (batch["input_ids"][~mask] == tokenizer.pad_token_id).all()
