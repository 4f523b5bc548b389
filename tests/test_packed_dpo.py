"""Packed preference pairs train exactly as padded ones.

Whole pairs are packed into rows (``data.packing``); the module recovers each sequence's
log-probability sum from the packed rows by their ``sequence_ids``. The same pairs, padded
in one batch or packed in one batch, give the same DPO loss, metric sums and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from src.datamodules import PreferenceDataModule
from src.datamodules.packing import pack_pairs
from src.datamodules.records import DataError
from src.modules.pairs import pair_inputs
from tests.conftest import ASSETS, write_jsonl
from tests.test_head import assert_same
from tests.test_preference_losses import dpo_module

PAIRS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "It is Rome, I think."},
    {"prompt": "2 + 2?", "chosen": "4", "rejected": "Five, or maybe six."},
    {"prompt": "Say hi.", "chosen": "Hi there, friend!", "rejected": "No."},
    {"prompt": "Colour of the sky?", "chosen": "Blue by day.", "rejected": "Green"},
    {"prompt": "Reverse: a b c", "chosen": "c b a", "rejected": "a b c d e f"},
    {"prompt": "Uppercase: cat", "chosen": "CAT", "rejected": "Cat, I suppose."},
    {"prompt": "Count to four.", "chosen": "1 2 3 4", "rejected": "1 2 4"},
]


def datamodule(path, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        tokenizer=str(ASSETS),
        train_files=str(path),
        val_split=0,
        cache_dir=None,
        max_length=64,
        **kwargs,
    )
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    rows = [{**p, "loss_weight": 1.0 + 0.25 * (i % 3)} if i % 2 else p for i, p in enumerate(PAIRS)]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def batches(pair_file) -> tuple[dict, dict, PreferenceDataModule]:
    """Every pair in one padded batch, and in one batch of packed rows of 128 tokens."""
    padded = datamodule(pair_file)
    packed = datamodule(pair_file, packing=True, pack_length=128)
    rows = packed.datasets["train"]
    assert 1 < len(rows) < len(PAIRS)  # several pairs share rows
    collate = [padded.collator(), packed.collator()]
    both = [c([d.datasets["train"][i] for i in range(len(d.datasets["train"]))])
            for c, d in zip(collate, (padded, packed), strict=True)]  # fmt: skip
    return both[0], both[1], packed


def sequences(batch, row_lengths=None) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each pair's (chosen tokens, rejected tokens) of a padded batch, or of a packed one
    whose rows hold ``row_lengths`` real tokens, in the batch's pair order."""
    inputs = pair_inputs(batch)
    if "sequence_ids" not in inputs:
        out = [tuple(r[m.bool()].tolist()) for r, m in zip(
            inputs["input_ids"], _concat_masks(batch), strict=True)]  # fmt: skip
    else:
        width = inputs["input_ids"].shape[1]
        real = torch.arange(width)[None, :] < torch.tensor(row_lengths)[:, None]
        ids, seq = inputs["input_ids"][real], inputs["sequence_ids"][real]
        out = [tuple(ids[seq == k].tolist()) for k in range(int(inputs["sequence_count"]))]
    half = len(out) // 2
    return list(zip(out[:half], out[half:], strict=True))


def _concat_masks(batch):
    return torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])


def test_pairs_pack_whole_into_rows_no_longer_than_the_row():
    columns = {
        "chosen_input_ids": [[1] * 5, [2] * 3, [3] * 7, [4] * 2],
        "chosen_labels": [[-1] * 5, [-2] * 3, [-3] * 7, [-4] * 2],
        "rejected_input_ids": [[5] * 4, [6] * 6, [7] * 1, [8] * 2],
        "rejected_labels": [[-5] * 4, [-6] * 6, [-7] * 1, [-8] * 2],
        "loss_weight": [1.0, 2.0, 3.0, 4.0],
    }
    rows = pack_pairs(columns, capacity=13)
    assert all(sum(n) == len(ids) <= 13 for n, ids in zip(
        rows["seq_lengths"], rows["input_ids"], strict=True))  # fmt: skip
    # each pair whole, chosen then rejected, its weight beside it
    seen = []
    for ids, lengths, weights in zip(
        rows["input_ids"], rows["seq_lengths"], rows["loss_weight"], strict=True
    ):
        start = 0
        for k in range(0, len(lengths), 2):
            chosen = ids[start : start + lengths[k]]
            rejected = ids[start + lengths[k] : start + lengths[k] + lengths[k + 1]]
            start += lengths[k] + lengths[k + 1]
            i = chosen[0] - 1
            assert chosen == columns["chosen_input_ids"][i]
            assert rejected == columns["rejected_input_ids"][i]
            assert weights[k // 2] == columns["loss_weight"][i]
            seen.append(i)
    assert sorted(seen) == [0, 1, 2, 3]
    # longest first into the tightest open row: 9 | 9 | 8, then 4 beside the first 9
    assert [len(r) for r in rows["input_ids"]] == [13, 9, 8]
    with pytest.raises(ValueError, match="2 preference pairs .* row length 8, the longest 9"):
        pack_pairs(columns, capacity=8)


def test_a_pair_longer_than_the_row_is_an_error_that_names_the_setting(pair_file):
    with pytest.raises(DataError, match="raise data.init_args.pack_length"):
        datamodule(pair_file, packing=True, pack_length=12)


def test_packed_rows_hold_the_same_sequences_with_restarting_positions(batches):
    padded, packed, dm = batches
    lengths = [sum(row["seq_lengths"]) for row in dm.datasets["train"]]
    assert sorted(sequences(packed, lengths)) == sorted(sequences(padded))
    assert "attention_mask" not in packed and packed["examples"].item() == len(PAIRS)
    assert packed["row_pairs"].sum().item() == len(PAIRS)
    positions, seq = packed["position_ids"], packed["sequence_ids"]
    for r, row in enumerate(dm.datasets["train"]):
        start = 0
        for n in row["seq_lengths"]:
            assert positions[r, start : start + n].tolist() == list(range(n))
            assert len(set(seq[r, start : start + n].tolist())) == 1
            start += n
    assert packed["real_tokens"] == padded["real_tokens"]
    efficiency = packed["real_tokens"] / packed["token_slots"]
    assert efficiency > padded["real_tokens"] / padded["token_slots"]


def grads_of(module, batch):
    module.zero_grad(set_to_none=True)
    terms = module.loss_terms(batch)
    terms.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return terms, grads, None


@pytest.mark.parametrize(
    ("loss_type", "lm_head", "attn"),
    [
        ("sigmoid", "lean", "sdpa"),
        ("sigmoid", "full", "sdpa"),
        ("ipo", "lean", "sdpa"),
        ("simpo", "lean", "sdpa"),
        ("sigmoid", "lean", "sdpa_varlen"),  # padded rows: plain sdpa; packed: per sequence
    ],
)
def test_packed_dpo_loss_and_gradients_equal_padded(
    micro_model_dir, batches, loss_type, lm_head, attn
):
    padded, packed, _ = batches
    module = dpo_module(
        micro_model_dir, loss_type=loss_type, lm_head=lm_head, attn_implementation=attn
    )
    module.train()  # training: the pairs' loss weights count
    with torch.no_grad():  # the policy off its reference
        for p in module.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    from src.modules import varlen_attention

    split = []  # the packed batch's rows, split per sequence in every layer under sdpa_varlen
    segments = varlen_attention.packed_segments
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(varlen_attention, "packed_segments", _recorded(segments, split))
        by_padding, by_packing = grads_of(module, padded), grads_of(module, packed)
    half = len(split) // 2  # each layer of the policy and of its reference, per batch
    if attn == "sdpa_varlen":  # padded: not split (plain sdpa); packed: split in each layer
        assert half == 2 * module.model.config.num_hidden_layers
        assert split[:half] == [None] * half and all(split[half:]), split
    else:
        assert split == []
    weights = [1.0 + 0.25 * (i % 3) if i % 2 else 1.0 for i in range(len(PAIRS))]
    assert by_padding[0].count.item() == pytest.approx(sum(weights))
    assert_same(by_padding, by_packing)


def test_packed_reference_log_probs_precomputed_on_the_packed_rows(tmp_path, micro_model_dir):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    dm = PreferenceDataModule(
        tokenizer=str(ASSETS), train_files=str(path), val_split=0, max_length=64,
        batch_size=2, packing=True, pack_length=128, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    dm.setup("fit")
    module = dpo_module(micro_model_dir, precompute_ref_logps=True)
    rows = [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]
    live = module.reference_logps(dm.collator()(rows))
    module.precompute_reference(dm)
    assert module.reference.model is None
    stored = dm.datasets["train"]
    assert [len(v) for v in stored["ref_chosen_logps"]] == [len(n) // 2 for n in
                                                            stored["seq_lengths"]]  # fmt: skip
    batch = dm.collator()([stored[i] for i in range(len(stored))])
    torch.testing.assert_close(module.reference_logps(batch), live, rtol=0, atol=1e-5)
    terms = module.loss_terms(batch)
    assert (terms.loss_sum / terms.count).item() == pytest.approx(math.log(2), abs=1e-5)


def _recorded(fn, calls):
    def wrapped(*args):
        calls.append(fn(*args))
        return calls[-1]

    return wrapped


def test_varlen_attention_splits_packed_rows_only():
    from src.modules.varlen_attention import packed_segments

    packed = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert packed_segments(packed, 6, 6) == [[0, 3, 5, 6], [0, 6]]
    assert packed_segments(torch.arange(6)[None].repeat(2, 1), 6, 6) is None  # one each
    left_padded = torch.tensor([[1, 1, 0, 1, 2, 3]])  # generate()'s positions of a prompt
    assert packed_segments(left_padded, 6, 6) is None
    assert packed_segments(packed, 6, 9) is None  # a key cache: not a packed batch
    assert packed_segments(None, 6, 6) is None
