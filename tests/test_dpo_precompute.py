"""precompute_ref_logps: reference log-probs stored with the data, and no reference kept."""

from __future__ import annotations

import math

import pytest
import torch

from src.datamodules import PreferenceDataModule
from src.modules import DPOModule
from tests.conftest import ASSETS, write_jsonl


def pairs(n: int) -> list[dict]:
    return [
        {"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)}
        for i in range(n)
    ]


def data_and_module(tmp_path, micro_model_dir, cache="cache", **module_kwargs):
    """Ten pairs (two for validation) cached under ``tmp_path / cache``, and a DPO module
    that precomputes its reference log-probs."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(10))
    dm = PreferenceDataModule(
        tokenizer=str(ASSETS),
        train_files=str(data),
        val_split=0.2,
        max_length=64,
        batch_size=4,
        cache_dir=str(tmp_path / cache),
    )
    module = DPOModule(
        model_name_or_path=str(micro_model_dir),
        from_scratch=True,
        tokenizer=str(ASSETS),
        precompute_ref_logps=True,
        **module_kwargs,
    )
    return dm, module


def setup(tmp_path, micro_model_dir):
    torch.manual_seed(0)  # the same initial weights in every call
    dm, module = data_and_module(tmp_path, micro_model_dir)
    dm.setup("fit")
    module.configure_model()
    return dm, module


def test_precomputed_logps_equal_the_reference_and_release_it(tmp_path, micro_model_dir):
    dm, module = setup(tmp_path, micro_model_dir)
    rows = [dm.datasets["train"][i] for i in range(4)]
    live = module.reference_logps(dm.collator()(rows))
    module.precompute_reference(dm)
    assert module.reference.model is None
    for split in ("train", "val"):
        assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(dm.datasets[split].column_names)
    batch = dm.collator()([dm.datasets["train"][i] for i in range(4)])
    assert torch.allclose(module.reference_logps(batch), live, atol=1e-5)
    terms = module.loss_terms(batch)
    assert (terms.loss_sum / terms.count).item() == pytest.approx(math.log(2), abs=1e-5)


def test_a_second_run_loads_them_from_the_data_cache(tmp_path, micro_model_dir, monkeypatch):
    dm, module = setup(tmp_path, micro_model_dir)
    module.precompute_reference(dm)
    first = dm.datasets["train"]["ref_chosen_logps"]
    dm2, module2 = setup(tmp_path, micro_model_dir)  # same seed: the same reference weights

    def fail(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(DPOModule, "reference_logps", fail)
    module2.precompute_reference(dm2)
    assert dm2.datasets["train"]["ref_chosen_logps"] == first


def fit_dpo(tmp_path, micro_model_dir, steps: int, ckpt_path=None, cache="cache"):
    import lightning.pytorch as pl

    pl.seed_everything(0)
    dm, module = data_and_module(
        tmp_path,
        micro_model_dir,
        cache,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        default_root_dir=str(tmp_path / "ckpts"),
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    assert module.reference.model is None  # no copy was ever made
    return dm, trainer


def test_a_resumed_fit_keeps_the_initial_policys_log_probs(tmp_path, micro_model_dir):
    """Resuming restores trained weights into the policy before the pass: the log-probs of
    the first run (the initial weights') are reused, not recomputed from trained weights."""
    first, trainer = fit_dpo(tmp_path, micro_model_dir, 2)
    ckpt = trainer.checkpoint_callback.best_model_path
    resumed, _ = fit_dpo(tmp_path, micro_model_dir, 4, ckpt_path=ckpt)
    assert (
        resumed.datasets["train"]["ref_chosen_logps"] == first.datasets["train"]["ref_chosen_logps"]
    )
    with pytest.raises(ValueError, match="no longer in the data cache"):
        fit_dpo(tmp_path, micro_model_dir, 4, ckpt_path=ckpt, cache="empty-cache")
