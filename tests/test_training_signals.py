"""Step signals: train/grad_norm before clipping, train/tokens_seen across a resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from src.datamodules import SFTDataModule
from src.modules import SFTModule
from tests.conftest import ASSETS, conversation, write_jsonl


class Capture(pl.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.real_tokens: list[int] = []
        self.before: dict[str, torch.Tensor] = {}
        self.grads: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.real_tokens.append(int(batch["real_tokens"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        if self.before:  # SGD with lr 1: the update is the (rescaled, clipped) gradient
            update = [self.before[n] - p.detach() for n, p in pl_module.model.named_parameters()]
            self.grads.append(torch.linalg.vector_norm(torch.cat([u.flatten() for u in update])))
            self.before = {}


@pytest.fixture()
def data_file(tmp_path):
    rows = [conversation(f"What is {i} + {i}?", str(2 * i) * (1 + i % 3)) for i in range(8)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def fit(tmp_path, data_file, model_dir, steps: int, clip: float | None = None, ckpt=None):
    pl.seed_everything(0)
    data = SFTDataModule(
        tokenizer=str(ASSETS), train_files=str(data_file), val_split=0, batch_size=2
    )
    module = SFTModule(
        model_name_or_path=str(model_dir),
        from_scratch=True,
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        scheduler="constant",
    )
    capture = Capture()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        gradient_clip_val=clip,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[capture],
    )
    trainer.fit(module, data, ckpt_path=ckpt)
    return capture, trainer


def test_grad_norm_is_logged_before_clipping(tmp_path, data_file, micro_model_dir):
    free, _ = fit(tmp_path / "a", data_file, micro_model_dir, 1)
    clipped, _ = fit(tmp_path / "b", data_file, micro_model_dir, 1, clip=0.01)
    norm = free.metrics[0]["train/grad_norm"]
    assert norm == pytest.approx(free.grads[0].item(), rel=1e-4)  # the applied gradient
    assert clipped.metrics[0]["train/grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert clipped.grads[0].item() == pytest.approx(0.01, rel=1e-3)  # clipped after logging


def test_tokens_seen_counts_real_tokens_and_survives_a_resume(tmp_path, data_file, micro_model_dir):
    first, trainer = fit(tmp_path, data_file, micro_model_dir, 3)
    seen = [m["train/tokens_seen"] for m in first.metrics]
    assert seen == [sum(first.real_tokens[: i + 1]) for i in range(3)]
    ckpt = trainer.checkpoint_callback.best_model_path
    resumed, _ = fit(tmp_path, data_file, micro_model_dir, 5, ckpt=ckpt)
    assert resumed.metrics[-1]["train/tokens_seen"] == seen[-1] + sum(resumed.real_tokens)
