"""Fits under FSDP and DeepSpeed on one CUDA GPU in bf16 (skipped without one).

Each runs a shipped objective config for a few steps with a shipped trainer preset, then
checks the loss, the sample generation, and that the hf/ export loads and matches the
trained weights' behaviour.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT
from tests.test_e2e import scalars

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NEEDS_DEEPSPEED = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install -e '.[deepspeed]')",
)


def fit(tmp_path, config: str, preset: str, *extra: str):
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        str(ROOT / "configs" / config),
        "--trainer",
        str(ROOT / "configs" / "trainer" / preset),
        "--trainer.devices",
        "1",
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "3",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
        *extra,
    ]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return next((tmp_path / "runs").glob("*/version_0"))


def check_run(run, stage_loss: str = "train/loss") -> None:
    losses = [v for _, v in scalars(run, stage_loss)]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(isinstance(s["output"], str) for s in samples)
    export = run / "hf" / ("merged" if (run / "hf" / "merged").exists() else "")
    model = AutoModelForCausalLM.from_pretrained(export)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("config", ["sft.yaml", "dpo.yaml", "pretrain.yaml"])
def test_fsdp(tmp_path, config):
    check_run(fit(tmp_path, config, "fsdp.yaml"))


def test_fsdp_lora(tmp_path):
    run = fit(
        tmp_path,
        "sft.yaml",
        "fsdp.yaml",
        "--config",
        str(ROOT / "configs" / "peft" / "lora.yaml"),
        "--model.init_args.lora.merge",
        "true",
    )
    check_run(run)


def test_fsdp_dpo_precomputed_reference(tmp_path):
    check_run(
        fit(tmp_path, "dpo.yaml", "fsdp.yaml", "--model.init_args.precompute_ref_logps", "true")
    )


@NEEDS_DEEPSPEED
@pytest.mark.parametrize("preset", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_sft(tmp_path, preset):
    check_run(fit(tmp_path, "sft.yaml", preset))


@NEEDS_DEEPSPEED
def test_deepspeed_zero3_dpo_precomputed_reference(tmp_path):
    check_run(
        fit(
            tmp_path,
            "dpo.yaml",
            "deepspeed_zero3.yaml",
            "--model.init_args.precompute_ref_logps",
            "true",
        )
    )
