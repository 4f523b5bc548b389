"""What a run tells its user: where predictions went, why a fit stopped, which path is
missing, which data file is empty, which options conflict, how far a long pass has got."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid

import lightning.pytorch as pl
import pytest
import torch

from src.callbacks.checkpoint import EarlyStop
from src.cli import cli_main
from src.datamodules import DataError, SFTDataModule
from src.local_paths import check_local_path
from src.modules import SFTModule
from src.modules.adapters import LoraSettings
from tests.conftest import ASSETS, ROOT, write_jsonl
from tests.test_dpo_precompute import setup as precompute_setup
from tests.test_generation import PROMPT_ROWS, predict_args


# ----------------------------------------------------------------- predict
def test_predict_says_how_many_predictions_it_wrote_and_where(tmp_path, micro_model_dir, caplog):
    caplog.set_level(logging.INFO)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    runs = tmp_path / "runs"
    # random weights from the config: the message, not the completions, is under test
    cli_main(predict_args(micro_model_dir, prompts, runs, "--model.init_args.from_scratch", "true"))
    out = runs / "sft" / "version_0" / "predictions.jsonl"
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(PROMPT_ROWS)
    assert f"[predict] {len(PROMPT_ROWS)} predictions written to {out}" in caplog.text


# ---------------------------------------------------------- early stopping
class ScriptedLoss(pl.LightningModule):
    """A module whose ``val/loss`` is a script: validation k logs ``losses[k]``."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.losses = losses
        self.validations = 0

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.weight * batch).sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.losses[self.validations])

    def on_validation_epoch_end(self) -> None:
        self.validations += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_early_stopping_says_once_why_and_when_it_stops(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    loader = torch.utils.data.DataLoader(torch.ones(20, 1))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=20,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[EarlyStop(patience=3)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    # best 0.5 at the second validation (step 2), then three without improvement
    trainer.fit(ScriptedLoss([1.0, 0.5, 0.6, 0.5, 0.7] + [0.1] * 20), loader, loader)
    assert trainer.global_step == 5
    message = "[early stopping] val/loss has not improved on 0.5000 for 3 validations: "
    assert caplog.text.count(message) == 1
    assert f"{message}stopping at step 5" in caplog.text


# ------------------------------------------------------------- local paths
@pytest.mark.parametrize(
    "value",
    [
        "/nowhere/model",
        "./model",
        "../model",
        "~/models/x",
        "models\\x",
        "runs/sft/hf",
        "org/name/",
        "runs/hf",  # runs/ exists here: a directory under it, not a hub id
    ],
)
def test_a_missing_local_looking_path_is_named(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError) as raised:
        check_local_path(value, "tokenizer")
    assert str(raised.value) == (
        f"tokenizer not found: {value} (no such file or directory; a hub id looks like org/name)"
    )


@pytest.mark.parametrize("value", ["gpt2", "Qwen/Qwen2.5-0.5B", "runs/hf"])
def test_hub_ids_and_existing_paths_pass(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    if value == "runs/hf":
        (tmp_path / "runs" / "hf").mkdir(parents=True)
    check_local_path(value, "model")


def test_every_model_path_is_checked(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="^tokenizer not found: "):
        SFTDataModule(tokenizer=missing, train_files="x.jsonl").tokenizer  # noqa: B018
    module = SFTModule(model_name_or_path=str(ASSETS), from_scratch=True)
    with pytest.raises(FileNotFoundError, match=f"^model not found: {missing} "):
        module.load_model(missing)
    module.lora = LoraSettings(adapter_path=missing)
    with pytest.raises(FileNotFoundError, match=f"^adapter not found: {missing} "):
        module.configure_model()


def test_train_py_names_a_mistyped_tokenizer_in_one_line():
    typo = f"runs/typo-{uuid.uuid4().hex[:8]}/hf"
    done = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/sft.yaml",
         "--data.init_args.tokenizer", typo, "--trainer.max_steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: tokenizer not found: {typo} (no such file or directory; "
        "a hub id looks like org/name)"
    )


# ------------------------------------------------------------ empty data
def empty_data_module(tmp_path, monkeypatch, *extra: str) -> SFTDataModule:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    cli = cli_main(
        ["--config", str(ROOT / "configs" / "sft.yaml"),
         "--data.init_args.tokenizer", str(ASSETS),
         "--data.init_args.train_files", "empty.jsonl",
         "--data.init_args.cache_dir", "null",
         "--trainer.logger", "false", *extra],
        run=False,
    )  # fmt: skip
    return cli.datamodule


def test_an_empty_training_file_is_named(tmp_path, monkeypatch):
    dm = empty_data_module(tmp_path, monkeypatch)
    with pytest.raises(DataError, match=r"^the training data hold no rows: empty\.jsonl$"):
        dm.setup("fit")


def test_an_empty_streamed_training_file_is_named(tmp_path, monkeypatch):
    dm = empty_data_module(
        tmp_path, monkeypatch, "--data.init_args.streaming", "true",
        "--data.init_args.val_split", "1", "--data.init_args.val_files", "null",
    )  # fmt: skip
    dm.setup("fit")
    with pytest.raises(DataError, match=r"^the training data hold no rows: empty\.jsonl$"):
        next(iter(dm.train_dataloader()))


def test_no_training_files_at_all_asks_for_them():
    with pytest.raises(DataError, match="^no training data: set data.train_files$"):
        SFTDataModule(tokenizer=str(ASSETS), cache_dir=None).setup("fit")


# ------------------------------------------------------------------ QLoRA
def test_qlora_from_scratch_is_refused_before_any_gpu_check():
    with pytest.raises(ValueError, match=r"^QLoRA quantises pretrained weights: "):
        SFTModule(
            model_name_or_path=str(ASSETS),
            from_scratch=True,
            lora=LoraSettings(load_in_4bit=True),
        )


# ------------------------------------------------------------ DPO precompute
def test_precomputing_reference_log_probs_reports_progress(tmp_path, micro_model_dir, caplog):
    caplog.set_level(logging.INFO)
    dm, module = precompute_setup(tmp_path, micro_model_dir)  # 8 training pairs, 2 held out
    module.precompute_reference(dm)
    lines = [r.getMessage() for r in caplog.records if "reference log-probs of" in r.getMessage()]
    assert lines == [
        "[data] reference log-probs of train: 4/8 pairs",
        "[data] reference log-probs of train: 8/8 pairs",
        "[data] reference log-probs of val: 2/2 pairs",
    ]


def test_train_py_shows_our_errors_behind_the_parser_s_as_one_line():
    from src.errors import ConfigError, PathNotFoundError
    from src.resume import ResumeError
    from train import user_error

    refused = ResumeError("--ckpt_path last resumes ...")
    wrapped = ValueError("Does not validate against any of the Union subtypes")
    wrapped.__cause__ = refused
    assert user_error(wrapped) == ("config error", refused)
    assert user_error(ConfigError("x"))[0] == "config error"
    assert user_error(PathNotFoundError("model not found: x"))[0] == "error"
    assert user_error(FileNotFoundError("a library's own")) is None  # a traceback, as it was
    assert user_error(ValueError("not ours")) is None
