"""DivergenceGuard: a NaN/Inf loss or gradient stops the run before the update (no new
checkpoint) or skips the step (weights and optimizer state untouched)."""

from __future__ import annotations

import copy
import math
import runpy
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from src.callbacks import DivergenceError, DivergenceGuard
from src.callbacks.divergence import _first_bad
from src.modules import SFTModule
from tests.conftest import ROOT

BAD_PARAM = "model.model.layers.1.mlp.down_proj.weight"


class Faulty(SFTModule):
    """SFT whose summed loss is NaN at the chosen training micro-batches (0-based, in order)."""

    def __init__(self, *args, nan_at: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at = set(nan_at)
        self.micro_batches = 0

    def loss_terms(self, batch):
        terms = super().loss_terms(batch)
        if self.training:
            if self.micro_batches in self.nan_at:
                terms.loss_sum = terms.loss_sum * float("nan")
            self.micro_batches += 1
        return terms


class Snapshots(pl.Callback):
    """Weights, optimizer state and checkpoint files as each optimizer step begins."""

    def __init__(self, ckpt_dir: Path | None = None) -> None:
        self.ckpt_dir = ckpt_dir
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.optim: dict[int, dict] = {}
        self.files: dict[int, dict[str, tuple[bytes, int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.weights:  # a later micro-batch of the same step
            return
        self.weights[step] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self.optim[step] = copy.deepcopy(trainer.optimizers[0].state_dict())
        if self.ckpt_dir is not None:
            self.files[step] = ckpt_files(self.ckpt_dir)


class InfGrad(pl.Callback):
    """Make one gradient element infinite after backward, at one step: the loss stays finite."""

    def __init__(self, step: int, value: float = math.inf) -> None:
        self.step, self.value = step, value

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step + 1 == self.step:
            dict(pl_module.named_parameters())[BAD_PARAM].grad[0, 0] = self.value


def ckpt_files(path: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.glob("*.ckpt"))}


def fit(model_dir, guard, *, nan_at=(), max_steps=5, accumulate=1, callbacks=()):
    pl.seed_everything(0)
    module = Faulty(
        model_name_or_path=str(model_dir),
        from_scratch=True,
        nan_at=nan_at,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        scheduler="constant",
    )
    ids = torch.randint(5, len(module.tokenizer), (2 * max_steps * accumulate, 12))
    rows = [{"input_ids": row, "labels": row.clone()} for row in ids]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[guard, *callbacks],
    )
    return module, trainer, lambda: trainer.fit(module, DataLoader(rows, batch_size=2))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_stop_keeps_last_good_weights_and_checkpoints(micro_model_dir, tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=2,
        save_top_k=-1,
        save_last=True,
    )
    snaps = Snapshots(ckpt_dir)
    # micro-batch 3 is optimizer step 4, a step that would write a periodic checkpoint
    module, trainer, run = fit(
        micro_model_dir, DivergenceGuard(), nan_at=(3,), max_steps=6, callbacks=[checkpoint, snaps]
    )
    with pytest.raises(DivergenceError, match=r"optimizer step 4: non-finite loss") as err:
        run()
    assert err.value.step == 4 and err.value.reason == "non-finite loss (micro-batch 1 of 1)"
    assert trainer.global_step == 3
    assert_same(module.model.state_dict(), snaps.weights[3])  # the weights after step 3
    # step 2's checkpoints, byte for byte and untouched since; nothing written for step 4
    assert sorted(snaps.files[3]) == ["last.ckpt", "step=2.ckpt"]
    assert ckpt_files(ckpt_dir) == snaps.files[3]
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2


def test_skip_leaves_weights_and_optimizer_state_untouched(micro_model_dir):
    snaps = Snapshots()
    module, trainer, run = fit(
        micro_model_dir, DivergenceGuard(action="skip"), nan_at=(2,), callbacks=[snaps]
    )
    with pytest.warns(UserWarning, match=r"optimizer step 3: non-finite loss .*skipped"):
        run()
    assert trainer.global_step == 5  # training went on to max_steps
    assert_same(snaps.weights[3], snaps.weights[2])  # step 3 changed nothing
    before, after = snaps.optim[2]["state"], snaps.optim[3]["state"]
    assert before.keys() == after.keys() and len(before) > 0
    for index in before:
        assert_same(before[index], after[index])
    assert not torch.equal(snaps.weights[4]["lm_head.weight"], snaps.weights[3]["lm_head.weight"])
    optimizer_state = trainer.optimizers[0].state_dict()["state"]
    assert {s["step"].item() for s in optimizer_state.values()} == {4.0}  # 5 steps, 1 skipped
    assert trainer.callback_metrics["train/skipped_steps"].item() == 1
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())


def test_gradient_only_divergence_names_the_parameter(micro_model_dir):
    snaps = Snapshots()
    module, trainer, run = fit(
        micro_model_dir, DivergenceGuard(), callbacks=[snaps, InfGrad(step=2, value=-math.inf)]
    )
    with pytest.raises(DivergenceError, match=r"optimizer step 2: non-finite gradient") as err:
        run()
    assert err.value.reason == f"non-finite gradient of {BAD_PARAM}"
    assert_same(module.model.state_dict(), snaps.weights[1])


def test_accumulated_nan_micro_batch_and_max_skips_in_a_row(micro_model_dir):
    """Two micro-batches a step; NaN in the first micro-batch of steps 1, 3 and 4. Step 1 is
    skipped, step 2 applied (the count in a row restarts), step 3 skipped, and step 4 is the
    second in a row with max_skips 1: the run stops."""
    snaps = Snapshots()
    guard = DivergenceGuard(action="skip", max_skips=1)
    module, trainer, run = fit(
        micro_model_dir, guard, nan_at=(0, 4, 6), accumulate=2, max_steps=6, callbacks=[snaps]
    )
    with (
        pytest.warns(UserWarning, match="optimizer step 3: non-finite loss"),
        pytest.raises(
            DivergenceError, match=r"optimizer step 4: .*1 steps skipped in a row"
        ) as err,
    ):
        run()
    assert err.value.reason == "non-finite loss (micro-batch 1 of 2)"
    assert guard.skipped == 2
    assert_same(snaps.weights[1], snaps.weights[0])
    assert_same(snaps.weights[3], snaps.weights[2])
    assert_same(module.model.state_dict(), snaps.weights[3])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_first_bad_finds_every_non_finite_kind(value):
    good, bad = torch.zeros(3, 4), torch.zeros(3, 4)
    bad[2, 1] = value
    flags = [torch.tensor(True), torch.tensor(math.isfinite(value))]
    micro, param = _first_bad(flags, ["a", "b", "c"], [good, bad, bad], torch.device("cpu"))
    assert (micro, param) == (1, "b")
    assert _first_bad(flags[:1], ["a"], [good], torch.device("cpu")) == (None, None)


def test_train_py_prints_one_line(monkeypatch):
    def diverge(*args, **kwargs):
        raise DivergenceError(7, "non-finite loss", "optimizer step 7: non-finite loss")

    monkeypatch.setattr("src.cli.cli_main", diverge)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    # a string exit code: printed to stderr, exit status 1
    assert exit_info.value.code == "training diverged: optimizer step 7: non-finite loss"


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="'stop' or 'skip'"):
        DivergenceGuard(action="reset")
    with pytest.raises(ValueError, match="max_skips"):
        DivergenceGuard(action="skip", max_skips=-1)


def test_engine_owned_gradients_check_the_loss_only():
    """DeepSpeed keeps its gradients out of ``param.grad``: 'skip' could not drop them."""
    deepspeed_like = SimpleNamespace(
        strategy=SimpleNamespace(handles_gradient_accumulation=True),
        precision_plugin=SimpleNamespace(),
    )
    guard = DivergenceGuard()
    guard.on_fit_start(deepspeed_like, None)
    assert guard._check_grads is False
    with pytest.raises(ValueError, match="use action 'stop'"):
        DivergenceGuard(action="skip").on_fit_start(deepspeed_like, None)
    fp16 = SimpleNamespace(strategy=SimpleNamespace(), precision_plugin=SimpleNamespace(scaler=1))
    guard.on_fit_start(fp16, None)
    assert guard._check_grads is False
