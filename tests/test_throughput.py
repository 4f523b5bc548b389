"""The Throughput callback: FLOPs per token, the peak table, and what a fit logs."""

from __future__ import annotations

import csv
import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from transformers import LlamaConfig, LlamaForCausalLM

from src.callbacks import Throughput
from src.callbacks import throughput as throughput_module
from src.callbacks.throughput import device_peak_tflops, flops_per_token, non_embedding_params
from src.datamodules import SFTDataModule
from src.datamodules.collate import PreferenceCollator
from src.modules import SFTModule
from tests.conftest import ASSETS, conversation, write_jsonl

THROUGHPUT_KEYS = {
    "train/tokens_per_sec",
    "train/samples_per_sec",
    "train/mfu",
    "train/peak_memory_gb",
    "train/padding_efficiency_avg",
}


def tiny_config(**kwargs) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **kwargs,
    )


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_by_hand(tied):
    config = tiny_config(tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    # Per layer: q and o 64*64 each, k and v 64*(2 kv heads * 16) each, gate/up/down
    # 3*64*128, two RMSNorms 2*64; then the final norm 64 and the LM head 256*64, which
    # counts even when tied (it is a matmul); the 256*64 input embedding does not.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64  # 36,992
    n = 2 * per_layer + 64 + 256 * 64  # 73,984 + 64 + 16,384 = 90,432
    assert n == 90_432
    assert non_embedding_params(model) == n
    all_params = sum(p.numel() for p in model.parameters())
    assert all_params == n + (0 if tied else 256 * 64)  # tied: one matrix, listed once
    # 6N + 12 * L * H * Q * T = 6 * 90,432 + 12 * 2 * 4 * 16 * 128 = 542,592 + 196,608
    assert flops_per_token(config, n, seq_len=128) == 739_200
    assert flops_per_token(config, n, seq_len=1) == 542_592 + 12 * 2 * 4 * 16


def test_flops_per_token_reads_an_explicit_head_dim():
    config = tiny_config(head_dim=32)  # wider heads than hidden / heads (Qwen3, Gemma)
    assert flops_per_token(config, 1000, seq_len=10) == 6 * 1000 + 12 * 2 * 4 * 32 * 10


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA GeForce RTX 4090", None),
        ("", None),
        (None, None),
    ],
)
def test_device_peak_tflops(name, peak):
    assert device_peak_tflops(name) == peak


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        Throughput(every_n_steps=0)
    with pytest.raises(ValueError, match="peak_tflops"):
        Throughput(peak_tflops=0)


def test_preference_pairs_count_as_one_sample_and_both_sides():
    callback = Throughput()
    ids = torch.zeros(3, 10, dtype=torch.long)
    rows = [
        {"chosen_input_ids": [1] * n, "chosen_labels": [1] * n}
        | {"rejected_input_ids": [2] * 10, "rejected_labels": [2] * 10}
        for n in (4, 7, 10)
    ]
    callback._count(PreferenceCollator(pad_token_id=0)(rows))  # 3 pairs 10 wide: 60 slots
    assert (callback._real, callback._samples, callback._slots) == (51, 3, 60)
    callback._count({"input_ids": ids})  # another collator's batch: every slot counts
    assert (callback._real, callback._samples, callback._slots) == (81, 6, 90)
    # packed pairs: a row of two pairs (4 + 3 and 2 + 2 tokens) and a row of one (5 + 5)
    packed = [
        {"input_ids": [3] * 11, "labels": [3] * 11, "seq_lengths": [4, 3, 2, 2]},
        {"input_ids": [4] * 10, "labels": [4] * 10, "seq_lengths": [5, 5]},
    ]
    callback._count(PreferenceCollator(pad_token_id=0)(packed))  # 2 rows 11 wide
    assert (callback._real, callback._samples, callback._slots) == (102, 9, 112)


class FakeClock(pl.Callback):
    """Stands in for time.perf_counter: each micro-batch takes a known time, validation 100 s.

    Placed before Throughput, so a batch's time has passed when Throughput sees its end."""

    def __init__(self) -> None:
        self.now = 0.0
        self.validations = 0
        self.batches: list[types.SimpleNamespace] = []

    def perf_counter(self) -> float:
        return self.now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        duration = 0.5 + 0.25 * len(self.batches)
        self.now += duration
        ids = batch["input_ids"]
        self.batches.append(
            types.SimpleNamespace(
                seconds=duration,
                real=batch["real_tokens"].item(),
                slots=ids.numel(),
                rows=ids.shape[0],
                width=ids.shape[1],
            )
        )

    def on_validation_batch_end(self, *args) -> None:
        self.now += 100.0  # left out of the window
        self.validations += 1


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("throughput")
    rows = [
        conversation("What is 2 + 3?", "5"),
        conversation("Reverse the words: red fox sleeps", "sleeps fox red"),
        conversation("Uppercase: blue bird", "BLUE BIRD", "Now reverse it.", "BIRD BLUE"),
        conversation("Sort these numbers: 9 4 7 1 3 8", "1 3 4 7 8 9"),
    ] * 2
    return write_jsonl(path / "train.jsonl", rows), write_jsonl(path / "val.jsonl", rows[:2])


def fit(data_files, model_dir, tmp_path, monkeypatch, callback: Throughput):
    """6 optimizer steps of 2 micro-batches of 2 rows (3 epochs, validation after each)."""
    clock = FakeClock()
    monkeypatch.setattr(
        throughput_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter)
    )
    pl.seed_everything(0)
    data = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files=str(data_files[0]),
        val_files=str(data_files[1]),
        batch_size=2,
        cache_dir=None,
    )
    module = SFTModule(model_name_or_path=str(model_dir), from_scratch=True, scheduler="constant")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        accumulate_grad_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock, callback],
    )
    trainer.fit(module, data)
    with open(trainer.logger.experiment.metrics_file_path, newline="") as f:
        rows = list(csv.DictReader(f))
    logged = {
        int(r["step"]): {k: float(v) for k, v in r.items() if k in THROUGHPUT_KEYS and v}
        for r in rows
        if any(k in THROUGHPUT_KEYS and v for k, v in r.items())
    }
    return clock, logged, module


def windows(clock: FakeClock) -> list[list[types.SimpleNamespace]]:
    """The micro-batches of each logging window: 2 optimizer steps of 2 micro-batches."""
    assert len(clock.batches) == 12
    return [clock.batches[i : i + 4] for i in range(0, 12, 4)]


def test_fit_logs_rates_over_each_window(data_files, micro_model_dir, tmp_path, monkeypatch):
    clock, logged, _ = fit(
        data_files, micro_model_dir, tmp_path, monkeypatch, Throughput(every_n_steps=2)
    )
    # Optimizer steps 2, 4, 6, at the logger steps of their train/loss (one less).
    assert sorted(logged) == [1, 3, 5] and clock.validations == 3  # after steps 2, 4, 6
    for step, window in zip([1, 3, 5], windows(clock), strict=True):
        seconds = sum(b.seconds for b in window)  # validation's 100 s left out
        real, slots = sum(b.real for b in window), sum(b.slots for b in window)
        rows = sum(b.rows for b in window)
        metrics = logged[step]
        assert set(metrics) == {
            "train/tokens_per_sec",
            "train/samples_per_sec",
            "train/padding_efficiency_avg",
        }  # no train/mfu nor train/peak_memory_gb on a CPU
        assert rows == 8 and real > 0 and real < slots  # padded batches
        assert metrics["train/tokens_per_sec"] == pytest.approx(real / seconds, rel=1e-6)
        assert metrics["train/samples_per_sec"] == pytest.approx(8 / seconds, rel=1e-6)
        assert metrics["train/padding_efficiency_avg"] == pytest.approx(real / slots, rel=1e-6)


def test_mfu_by_hand_on_a_faked_h100(data_files, micro_model_dir, tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(throughput_module, "_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    callback = Throughput(every_n_steps=6)
    clock, logged, module = fit(data_files, micro_model_dir, tmp_path, monkeypatch, callback)

    # The micro model: d 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128, tied head.
    vocab = len(tokenizer)
    n = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64 + vocab * 64
    assert callback._n_params == n == non_embedding_params(module.model)
    # Each micro-batch: real tokens * (6N + 12 * L * H * Q * T), T its row width.
    flops = sum(b.real * (6 * n + 12 * 2 * 4 * 16 * b.width) for b in clock.batches)
    seconds = sum(b.seconds for b in clock.batches)
    assert sorted(logged) == [5]  # one window: all 6 steps
    assert logged[5]["train/mfu"] == pytest.approx(flops / seconds / 989e12, rel=1e-6)
    assert "train/peak_memory_gb" not in logged[5]  # the device is still a CPU
