"""Per-example loss weights: from sources and rows, through packing and collation, to losses."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from src.datamodules import PreferenceDataModule, PretrainDataModule, SFTDataModule
from src.datamodules.records import DataError
from src.modules import DPOModule, SFTModule
from src.modules.losses import token_cross_entropy
from tests.conftest import ASSETS, conversation, write_jsonl


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    easy = write_jsonl(
        root / "easy.jsonl",
        [conversation(f"What is {i} + 1?", str(i + 1)) for i in range(6)],
    )
    hard = write_jsonl(
        root / "hard.jsonl",
        [conversation(f"Reverse the words: fox {i} runs", f"runs {i} fox") for i in range(6)],
    )
    return easy, hard


def sft_data(sources, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(
        tokenizer=str(ASSETS), train_files=sources, val_split=0, cache_dir=None, **kwargs
    )
    dm.setup("fit")
    return dm


def all_rows(dm: SFTDataModule | PreferenceDataModule) -> list[dict]:
    return [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]


def row_weight_of_labels(batch: dict[str, torch.Tensor]) -> set[float]:
    mask = batch["labels"] != -100
    return set(batch["loss_weights"][mask].tolist())


def test_source_weights_reach_every_label_token(two_sources):
    easy, hard = two_sources
    dm = sft_data(
        [{"path": str(easy), "loss_weight": 0.5}, {"path": str(hard), "loss_weight": 2.0}],
        batch_size=12,
    )
    assert dm.stats["train"].loss_weighted == 12
    assert "12 examples with a loss weight other than 1" in dm.stats["train"].summary("train")
    batch = dm.collator()(all_rows(dm))
    for i in range(12):
        text = dm.tokenizer.decode(batch["input_ids"][i][batch["attention_mask"][i] == 1])
        weights = set(batch["loss_weights"][i][batch["labels"][i] != -100].tolist())
        assert weights == ({2.0} if "Reverse" in text else {0.5})


def test_packed_rows_weight_each_document(two_sources):
    easy, hard = two_sources
    sources = [{"path": str(easy), "loss_weight": 0.5}, {"path": str(hard), "loss_weight": 2.0}]
    for padding_free in (False, True):
        dm = sft_data(sources, packing=True, max_length=80, padding_free=padding_free)
        rows = all_rows(dm)
        assert all(len(r["seq_weights"]) == len(r["seq_lengths"]) for r in rows)
        assert any(len(set(r["seq_weights"])) == 2 for r in rows)  # mixed rows exist
        batch = dm.collator()(rows)
        for i in range(batch["input_ids"].shape[0]):
            starts = (batch["position_ids"][i] == 0).nonzero().flatten().tolist()
            ends = starts[1:] + [batch["input_ids"].shape[1]]
            for start, end in zip(starts, ends, strict=True):
                labelled = batch["labels"][i, start:end] != -100
                if not labelled.any():
                    continue  # the padding tail
                text = dm.tokenizer.decode(batch["input_ids"][i, start:end])
                weights = set(batch["loss_weights"][i, start:end][labelled].tolist())
                assert weights == ({2.0} if "Reverse" in text else {0.5})


def test_row_field_multiplies_the_source_weight(tmp_path):
    rows = [conversation("Hi", "Hello") | {"loss_weight": w} for w in (1, 0.5, 4)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    dm = sft_data([{"path": str(path), "loss_weight": 2.0}], batch_size=3)
    assert dm.datasets["train"]["loss_weight"] == [2.0, 1.0, 8.0]


def test_renamed_weight_column(tmp_path):
    rows = [conversation("Hi", "Hello") | {"quality": q} for q in (0.5, 1.5)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    dm = sft_data(str(path), columns={"loss_weight": "quality"}, format="messages")
    assert dm.datasets["train"]["loss_weight"] == [0.5, 1.5]


def test_unweighted_data_carry_no_weights(two_sources):
    dm = sft_data([str(p) for p in two_sources], packing=True, max_length=64)
    assert "seq_weights" not in dm.datasets["train"].column_names
    assert "loss_weights" not in dm.collator()(all_rows(dm))
    assert dm.stats["train"].loss_weighted == 0


@pytest.mark.parametrize("bad", [-1, "heavy", True, float("nan")])
def test_bad_row_weight_names_the_row(tmp_path, bad):
    rows = [conversation("Hi", "Hello"), conversation("Hi", "Hey") | {"loss_weight": bad}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)  # json writes NaN as NaN
    with pytest.raises(DataError, match=r"rows.jsonl:2: loss_weight must be a finite number"):
        sft_data(str(path))


def test_bad_source_weight(two_sources):
    with pytest.raises(DataError, match=r"easy.jsonl: loss_weight must be a finite number >= 0"):
        sft_data([{"path": str(two_sources[0]), "loss_weight": -0.5}])


def test_cache_key_follows_the_loss_weight(two_sources, tmp_path):
    def key(weight: float) -> str:
        dm = SFTDataModule(
            tokenizer=str(ASSETS),
            train_files=[{"path": str(two_sources[0]), "loss_weight": weight}],
            cache_dir=str(tmp_path),
        )
        return dm.cache_path.name

    assert key(1.0) != key(2.0)


def test_pretraining_rejects_loss_weights(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one two three"}])
    dm = PretrainDataModule(
        tokenizer=str(ASSETS),
        train_files=[{"path": str(path), "loss_weight": 2.0}],
        val_split=0,
        cache_dir=None,
    )
    with pytest.raises(DataError, match="loss weights apply to SFT and preference data"):
        dm.setup("fit")


def test_weighted_cross_entropy_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, 5, -100], [-100, -100, 1, 6]])
    weights = torch.tensor([[9.0, 2.0, 2.0, 2.0], [9.0, 9.0, 0.5, 0.5]])
    loss_sum, count, correct = token_cross_entropy(logits, labels, weights=weights)
    logp = torch.log_softmax(logits, -1)
    terms = [(0, 0, 3, 2.0), (0, 1, 5, 2.0), (1, 1, 1, 0.5), (1, 2, 6, 0.5)]
    expected = sum(-w * logp[b, t, y] for b, t, y, w in terms)
    right = sum(w * float(logits[b, t].argmax() == y) for b, t, y, w in terms)
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    assert count.item() == 5.0
    assert correct.item() == pytest.approx(right)


def test_validation_loss_ignores_loss_weights(two_sources, micro_model_dir):
    """val/loss is the plain token mean, so runs with different weights compare on it."""
    easy, hard = two_sources

    def val_loss(sources) -> float:
        dm = SFTDataModule(
            tokenizer=str(ASSETS), train_files=sources, val_files=sources, cache_dir=None
        )
        torch.manual_seed(0)
        module = SFTModule(model_name_or_path=str(micro_model_dir), from_scratch=True)
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        return trainer.validate(module, dm, verbose=False)[0]["val/loss"]

    plain = val_loss([str(easy), str(hard)])
    weighted = val_loss(
        [{"path": str(easy), "loss_weight": 0.1}, {"path": str(hard), "loss_weight": 5.0}]
    )
    assert weighted == pytest.approx(plain, rel=1e-6)


def test_dpo_pairs_take_their_weights(tmp_path, micro_model_dir):
    pairs = [
        {"prompt": f"Name a colour {i}.", "chosen": "Blue" + " sky" * i, "rejected": "Fox"}
        for i in range(4)
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    dm = PreferenceDataModule(
        tokenizer=str(ASSETS),
        train_files=[{"path": str(path), "loss_weight": 3.0, "max_rows": 2}, str(path)],
        val_split=0,
        cache_dir=None,
    )
    dm.setup("fit")
    batch = dm.collator()(all_rows(dm))
    assert batch["loss_weight"].tolist() == [3.0, 3.0, 1.0, 1.0, 1.0, 1.0]
    torch.manual_seed(0)
    module = DPOModule(
        model_name_or_path=str(micro_model_dir), from_scratch=True, loss_type="simpo"
    )
    module.configure_model()
    module.train()  # the micro model has no dropout: train and eval logits agree
    weighted = module.loss_terms(batch)
    module.eval()
    plain = module.loss_terms(batch)
    singles = [module.loss_terms(pair(batch, i)) for i in range(6)]
    weights = [3.0, 3.0, 1.0, 1.0, 1.0, 1.0]
    assert weighted.count.item() == 10.0 and plain.count.item() == 6.0
    assert weighted.loss_sum.item() == pytest.approx(
        sum(w * t.loss_sum.item() for w, t in zip(weights, singles, strict=True)), rel=1e-5
    )
    assert plain.loss_sum.item() == pytest.approx(sum(t.loss_sum.item() for t in singles), rel=1e-5)
    for key in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
        expected = sum(w * t.sums[key].item() for w, t in zip(weights, singles, strict=True))
        assert weighted.sums[key].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def pair(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Pair ``i`` of a preference batch as a batch of one."""
    return {k: v[i : i + 1] for k, v in batch.items() if v.ndim > 0}


def test_streamed_rows_keep_their_weights(two_sources):
    easy, hard = two_sources
    dm = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files=[{"path": str(easy), "loss_weight": 0.5}, str(hard)],
        val_split=2,
        streaming=True,
        cache_dir=None,
    )
    dm.setup("fit")
    rows = list(dm.stream_rows(skip=2))
    assert [r["loss_weight"] for r in rows] == [0.5] * 4 + [1.0] * 6
