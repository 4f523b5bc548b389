"""The loss of an optimizer step is the mean over all its label tokens, however it is split."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from src.datamodules import SFTDataModule
from src.modules import SFTModule
from src.modules.losses import token_cross_entropy
from tests.conftest import ASSETS, conversation, write_jsonl


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: v.clone() for k, v in batch.items()})


def one_step(train_files, model_dir, micro_batch: int, accumulate: int, **data_kwargs):
    pl.seed_everything(0)
    data = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files=train_files if isinstance(train_files, list) else str(train_files),
        val_split=0.0,
        batch_size=micro_batch,
        cache_dir=None,
        **data_kwargs,
    )
    module = SFTModule(
        model_name_or_path=str(model_dir),
        from_scratch=True,
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        scheduler="constant",
    )
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    trainer.fit(module, data)
    final = module.model.state_dict()
    update = {k: recorder.initial[k] - final[k] for k in final}  # SGD, lr 1: the gradient
    return update, trainer.callback_metrics["train/loss"].item(), recorder


@pytest.fixture(scope="module")
def variable_length_data(tmp_path_factory):
    rows = [
        conversation("What is 2 + 3?", "5"),
        conversation("Reverse the words: red fox sleeps", "sleeps fox red"),
        conversation("Uppercase: blue bird", "BLUE BIRD", "Now reverse it.", "BIRD BLUE"),
        conversation("Sort these numbers: 9 4 7 1 3 8", "1 3 4 7 8 9"),
    ] * 2
    return write_jsonl(tmp_path_factory.mktemp("acc") / "train.jsonl", rows)


def test_accumulated_micro_batches_equal_one_batch(variable_length_data, micro_model_dir):
    full, full_loss, rec_full = one_step(variable_length_data, micro_model_dir, 4, 1)
    accum, accum_loss, rec_accum = one_step(variable_length_data, micro_model_dir, 1, 4)
    assert len(rec_full.batches) == 1 and len(rec_accum.batches) == 4
    for name, value in full.items():
        torch.testing.assert_close(accum[name], value, rtol=1e-4, atol=1e-6, msg=name)

    # The logged loss is the token-weighted mean over the step, computed here by hand.
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir))
    model.load_state_dict(rec_accum.initial)
    sums, counts = [], []
    with torch.no_grad():
        for batch in rec_accum.batches:
            logits = model(input_ids=batch["input_ids"]).logits
            loss_sum, count, _ = token_cross_entropy(logits, batch["labels"])
            sums.append(loss_sum.item())
            counts.append(count.item())
    token_mean = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts, strict=True)) / len(sums)
    assert len(set(counts)) > 1 and abs(token_mean - mean_of_means) > 1e-3
    assert accum_loss == pytest.approx(token_mean, rel=1e-5)
    assert full_loss == pytest.approx(token_mean, rel=1e-5)


def hand_step_loss(model_dir, recorder, weighted: bool) -> float:
    """The step's (weighted) token mean of the recorded micro-batches, by a plain model."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model.load_state_dict(recorder.initial)
    total, norm = 0.0, 0.0
    with torch.no_grad():
        for batch in recorder.batches:
            logits = model(input_ids=batch["input_ids"]).logits
            per_token = torch.nn.functional.cross_entropy(
                logits[0, :-1], batch["labels"][0, 1:], reduction="none", ignore_index=-100
            )
            mask = batch["labels"][0, 1:] != -100
            w = batch["loss_weights"][0, 1:] if weighted else torch.ones_like(per_token)
            total += (per_token * w * mask).sum().item()
            norm += (w * mask).sum().item()
    return total / norm


def test_loss_weights_accumulate_exactly(variable_length_data, micro_model_dir, tmp_path):
    """Two sources weighted 0.25 and 3: 8 micro-batches of 1 give the update of one batch of
    8, and train/loss is the weighted token mean sum(w * ce) / sum(w)."""
    other = write_jsonl(
        tmp_path / "other.jsonl",
        [
            conversation("Count the words: a b c d e f g h", "8"),
            conversation("First word of: green hills", "green"),
            conversation("What is 12 + 30?", "42", "And 1 + 1?", "2"),
            conversation("Say hello.", "Hello there, how can I help you today?"),
        ],
    )
    sources = [
        {"path": str(variable_length_data), "loss_weight": 0.25, "max_rows": 4},
        {"path": str(other), "loss_weight": 3.0},
    ]
    full, full_loss, _ = one_step(sources, micro_model_dir, 8, 1)
    accum, accum_loss, rec = one_step(sources, micro_model_dir, 1, 8)
    for name, value in full.items():
        torch.testing.assert_close(accum[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert {b["loss_weights"][0, 1].item() for b in rec.batches} == {0.25, 3.0}
    weighted = hand_step_loss(micro_model_dir, rec, weighted=True)
    plain = hand_step_loss(micro_model_dir, rec, weighted=False)
    assert abs(weighted - plain) > 1e-3  # the weights change the objective
    assert accum_loss == pytest.approx(weighted, rel=1e-5)
    assert full_loss == pytest.approx(weighted, rel=1e-5)


def test_uniform_loss_weights_change_nothing(variable_length_data, micro_model_dir):
    """Weights are relative: every example at 2 trains exactly like no weights at all."""
    plain, plain_loss, _ = one_step(variable_length_data, micro_model_dir, 4, 1)
    doubled, doubled_loss, rec = one_step(
        [{"path": str(variable_length_data), "loss_weight": 2.0}], micro_model_dir, 4, 1
    )
    assert (rec.batches[0]["loss_weights"] == 2.0).all()
    assert doubled_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, value in plain.items():
        torch.testing.assert_close(doubled[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_weight_decay_skips_biases_and_norm_weights(micro_model_dir, monkeypatch):
    monkeypatch.setattr(pl.Trainer, "estimated_stepping_batches", property(lambda self: 10))
    module = SFTModule(model_name_or_path=str(micro_model_dir), from_scratch=True)
    module.configure_model()
    module.trainer = pl.Trainer(accelerator="cpu", max_steps=10, logger=False)
    module.trainer.strategy.connect(module)
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] > 0
    assert "model.layers.0.self_attn.q_proj.weight" in decayed
    assert {names[id(p)] for p in no_decay["params"]} == {n for n in names.values() if "norm" in n}


def test_weight_decay_groups_follow_the_real_shape_of_zero3_placeholders(
    micro_model_dir, monkeypatch
):
    """Under ZeRO-3 every weight is an empty 1-D placeholder while the groups are built; its
    real shape (``ds_shape``) decides, or every weight would lose its decay."""
    from src.modules.base import CausalLMModule

    built = CausalLMModule.build_model

    def partitioned(self):
        model = built(self)
        for param in model.parameters():
            shape = param.shape
            param.data = torch.empty(0, dtype=param.dtype)
            param.ds_shape = shape
        return model

    monkeypatch.setattr(CausalLMModule, "build_model", partitioned)
    module = SFTModule(model_name_or_path=str(micro_model_dir), from_scratch=True)
    module.configure_model()
    assert all(p.ndim == 1 for p in module.model.parameters())
    names = [n for n, _ in module.model.named_parameters()]
    assert "model.layers.0.self_attn.q_proj.weight" not in module._no_decay
    assert module._no_decay == {n for n in names if "norm" in n}


def test_norm_clipping_under_fsdp_goes_through_the_root_module(micro_model_dir):
    """Lightning's FSDP precision plugin refuses norm clipping, which every shipped config
    sets: the module clips through the root FSDP module (its norm spans all shards)."""
    import types

    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    clipped = []
    strategy = FSDPStrategy(precision_plugin=FSDPPrecision("32-true"))
    module = SFTModule(model_name_or_path=str(micro_model_dir), from_scratch=True)
    module.configure_model()
    root = types.SimpleNamespace(clip_grad_norm_=lambda value: clipped.append(value))
    module._trainer = types.SimpleNamespace(
        strategy=strategy,
        precision_plugin=strategy.precision_plugin,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="norm",
    )
    strategy._model = root
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    assert clipped == [1.0]
    with pytest.raises(Exception, match="not supported for `FSDPPrecision`"):
        strategy.precision_plugin.clip_grad_by_norm(optimizer, 1.0)  # what it replaces
