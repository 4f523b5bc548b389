"""Reward models: the Bradley-Terry loss (by hand and as TRL computes it), where the score is
read (left and right padding, packed rows), LoRA, and a fit whose export and ``predict`` score
like the trained module."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from src.cli import cli_main
from src.datamodules.collate import PreferenceCollator, pair_columns
from src.datamodules.packing import pack_pairs
from src.modules import LoraSettings, RewardModule
from src.modules.losses import bradley_terry_loss
from src.modules.reward import last_token_index
from tests.conftest import ROOT, conversation, write_jsonl
from tests.test_e2e import scalars


def reward_module(model_dir, **kwargs) -> RewardModule:
    torch.manual_seed(0)
    module = RewardModule(str(model_dir), from_scratch=True, **kwargs)
    module.configure_model()
    return module


def test_bradley_terry_loss_by_hand_with_margin_and_centering():
    chosen, rejected = torch.tensor([1.5, -0.2, 0.3]), torch.tensor([0.5, 0.4, 0.3])
    margin = torch.tensor([0.0, 1.0, -0.5])
    loss = bradley_terry_loss(chosen, rejected, margin, center_rewards_coefficient=0.1)
    by_hand = [
        math.log(1 + math.exp(-(c - r - m))) + 0.1 * (c + r) ** 2
        for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist(), strict=True)
    ]
    assert loss.tolist() == pytest.approx(by_hand, rel=1e-6)
    assert bradley_terry_loss(chosen, rejected)[0].item() == pytest.approx(math.log(1 + math.e**-1))


@pytest.mark.parametrize("margin, center", [(False, None), (True, 0.01)])
def test_loss_equals_trls_reward_trainer_on_the_same_rewards(margin, center):
    from trl import RewardTrainer

    chosen, rejected = torch.tensor([0.7, -1.2, 2.0, 0.1]), torch.tensor([0.2, 0.3, -1.0, 0.1])
    margins = torch.tensor([0.5, 0.0, 1.5, 0.2])
    inputs = {"attention_mask": torch.ones(8, 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = margins
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    logits = torch.cat([chosen, rejected])[:, None]
    theirs = RewardTrainer.compute_loss(trainer, lambda **_: SimpleNamespace(logits=logits), inputs)
    ours = bradley_terry_loss(chosen, rejected, margins if margin else None, center or 0.0).mean()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert trainer._metrics["train"]["accuracy"] == [pytest.approx(0.5)]  # 0.1 vs 0.1: not above


def test_the_score_is_read_at_each_sequence_end_whatever_the_padding_or_packing(micro_model_dir):
    module = reward_module(micro_model_dir).eval()
    seqs = [[5, 9, 14, 3, 2], [7, 8, 2], [11, 12, 13, 15, 16, 17, 2], [4, 2]]
    alone = torch.cat([module.sequence_scores({"input_ids": torch.tensor([s])}) for s in seqs])
    pad, width = module.tokenizer.pad_token_id, max(map(len, seqs))

    def padded(left: bool) -> dict[str, torch.Tensor]:
        ids = torch.full((len(seqs), width), pad)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            span = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, span], mask[i, span] = torch.tensor(s), 1
        return {"input_ids": ids, "attention_mask": mask}

    with torch.no_grad():
        for left in (False, True):
            batch = padded(left)
            assert module.sequence_scores(batch) == pytest.approx(alone, abs=1e-5)
            # transformers' own pooling (last token that is not the pad id) agrees
            assert module.model(**batch).logits.squeeze(-1) == pytest.approx(alone, abs=1e-5)
        # two pairs (chosen = seqs 0, 1; rejected = 2, 3) packed into one row
        columns = {
            "chosen_input_ids": seqs[:2],
            "chosen_labels": seqs[:2],
            "rejected_input_ids": seqs[2:],
            "rejected_labels": seqs[2:],
        }
        rows = pack_pairs(columns, capacity=64)
        rows = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["input_ids"]))]
        batch = PreferenceCollator(pad, pad_to_multiple_of=32)(rows)  # a padding tail too
        assert batch["input_ids"].shape == (1, 32) and (batch["sequence_ids"] == -1).any()
        assert module.sequence_scores(batch) == pytest.approx(alone, abs=1e-5)


def test_last_token_index_reads_the_mask_and_packed_sequence_ids():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    index = last_token_index({"input_ids": torch.zeros(3, 4), "attention_mask": mask})
    assert index.tolist() == [1, 7, 11]
    packed = {
        "input_ids": torch.zeros(2, 4),
        "sequence_ids": torch.tensor([[0, 0, 2, -1], [1, 3, 3, 3]]),
        "sequence_count": torch.tensor(4),
    }
    assert last_token_index(packed).tolist() == [1, 4, 2, 7]
    packed["sequence_count"] = torch.tensor(5)
    with pytest.raises(ValueError, match="has no token"):
        last_token_index(packed)


def test_margins_reach_padded_and_packed_batches_pair_by_pair():
    rows = [{"margin": 0.5}, {}, {"margin": 2.0}]
    assert pair_columns(rows)["margin"].tolist() == [0.5, 0.0, 2.0]
    assert "margin" not in pair_columns([{}, {"margin": 0.0}])  # neutral: no column
    packed = [{"margin": [1.0, 0.0]}, {"margin": [3.0]}]
    assert pair_columns(packed, [2, 1])["margin"].tolist() == [1.0, 0.0, 3.0]


def test_lora_reward_model_trains_the_head_whole_beside_the_adapters(micro_model_dir):
    module = reward_module(micro_model_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert any("score" in n and "lora_" not in n for n in trainable)  # the head, not adapted
    assert not any("embed_tokens" in n for n in trainable)
    batch = {
        "input_ids": torch.tensor([[5, 9, 2], [7, 2, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    }
    module.sequence_scores(batch).sum().backward()
    head = [p for n, p in module.model.named_parameters() if "score" in n and p.requires_grad]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


@pytest.mark.slow
def test_reward_fit_logs_pair_metrics_and_its_export_and_predict_score_alike(
    tmp_path, micro_model_dir
):
    pairs = [
        {"prompt": f"Say {w}", "chosen": w.upper(), "rejected": w, "margin": 0.5 * (i % 2)}
        for i, w in enumerate(["cat", "dog", "owl", "fox", "bee", "elk", "ant", "yak"])
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    common = [
        "--config", str(ROOT / "configs" / "reward.yaml"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.model_name_or_path", str(micro_model_dir),
        "--data.init_args.train_files", str(data), "--data.init_args.val_files", str(data),
        "--data.init_args.batch_size", "4", "--data.init_args.max_length", "64",
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    cli_main(
        ["fit", *common, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
         "--trainer.log_every_n_steps", "1", "--data.init_args.packing", "true"]
    )  # fmt: skip
    run = tmp_path / "runs" / "reward" / "version_0"
    for tag in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"):
        assert scalars(run, f"val/{tag}"), tag
    assert len(scalars(run, "train/loss")) == 3
    # untrained (rewards near 0): ln 2 for the pairs without a margin, ln(1 + e^0.5) with one
    untrained = (math.log(2) + math.log(1 + math.exp(0.5))) / 2
    assert scalars(run, "val/loss")[0][1] == pytest.approx(untrained, abs=0.03)

    rows = [conversation("Say cat", "CAT"), conversation("Say owl", "owl")]
    cli_main(
        ["predict", *common, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
         "--trainer.logger.init_args.name", "scores",
         "--data.init_args.predict_files", str(write_jsonl(tmp_path / "rows.jsonl", rows))]
    )  # fmt: skip
    lines = (tmp_path / "runs" / "scores" / "version_0" / "predictions.jsonl").read_text()
    predicted = [json.loads(line) for line in lines.splitlines()]
    assert [p["response"] for p in predicted] == ["CAT", "owl"]

    exported = AutoModelForSequenceClassification.from_pretrained(run / "hf").eval()
    module = RewardModule(str(micro_model_dir), from_scratch=True)
    datamodule = cli_main(common, run=False).datamodule
    ids = [datamodule.encode_scored(r["messages"][:1], r["messages"][1]["content"]) for r in rows]
    with torch.no_grad():
        hf = [exported(input_ids=torch.tensor([i])).logits.item() for i in ids]
        ours = module.sequence_scores({"input_ids": torch.tensor([ids[0]])}, model=exported)
    assert [p["score"] for p in predicted] == pytest.approx(hf, abs=1e-5)
    assert ours.item() == pytest.approx(hf[0], abs=1e-6)


def test_a_pad_token_that_is_the_eos_token_is_warned_about(micro_model_dir, tmp_path, tokenizer):
    """The export's own pooling (last token that is not the pad id) would read the token
    before each sequence's final EOS: the user is told, with what to do."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    tok.add_special_tokens({"eos_token": "<|im_end|>"})  # no pad token: EOS stands in
    tok.chat_template = tokenizer.chat_template
    tok.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="pad token is the EOS token"):
        reward_module(micro_model_dir, tokenizer=str(tmp_path))


@pytest.mark.slow
def test_predict_on_preference_data_generates_for_a_policy(tmp_path, micro_model_dir):
    """A DPO policy's predict generates from the prompts (with the chosen answers as the
    references) where a reward model's scores them."""
    data = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "Say hi", "chosen": "Hi", "rejected": "No"}]
    )
    cli_main(
        ["predict", "--config", str(ROOT / "configs" / "dpo.yaml"),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
         "--trainer.enable_progress_bar", "false",
         "--model.init_args.model_name_or_path", str(micro_model_dir),
         "--model.init_args.max_new_tokens", "2",
         "--data.init_args.train_files", str(data), "--data.init_args.val_files", str(data),
         "--data.init_args.cache_dir", str(tmp_path / "cache")]
    )  # fmt: skip
    lines = (tmp_path / "runs" / "dpo" / "version_0" / "predictions.jsonl").read_text()
    (row,) = [json.loads(line) for line in lines.splitlines()]
    assert row["prompt"][-1]["content"] == "Say hi" and row["reference"] == "Hi"
    assert isinstance(row["output"], str)
