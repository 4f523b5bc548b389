"""FSDP2 and FSDP1 on two CPU processes equal one plain process (SFT, resume, DPO, LoRA, predict,
the shipped preset); the runs and checks of ``test_ddp.py``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, conversation, write_jsonl
from tests.test_ddp import (  # noqa: F401 (fixtures among them)
    FSDP2,
    FULL,
    SHARDED,
    Run,
    assert_same_training,
    dpo_data,
    dpo_single,
    export_checkpoint,
    fit,
    run_command,
    saved_model_dir,
    sft_data,
    sft_single,
    sharded_models,
)

pytestmark = pytest.mark.slow

# ----------------------------------------------------------------------------- FSDP2, FSDP1

_two_step_runs: dict[str, Path] = {}


def two_step_run(strategy: str, processes: int, tmp_path_factory, model_dir, data) -> Path:
    """A copy of a 2-step SFT run (its last.ckpt sharded) under ``strategy``, made once."""
    key = f"{strategy}/{processes}"
    if key not in _two_step_runs:
        tmp = tmp_path_factory.mktemp("two-steps")
        fit("sft.yaml", tmp, "run", model_dir, data, processes,
            "--trainer.strategy", strategy, "--trainer.max_steps", "2")  # fmt: skip
        _two_step_runs[key] = tmp
    copy = tmp_path_factory.mktemp("resumed")
    shutil.copytree(_two_step_runs[key], copy, dirs_exist_ok=True)
    return copy


@SHARDED
def test_sharded_sft_matches_one_process_and_resumes_exactly(
    strategy, tmp_path_factory, saved_model_dir, sft_data, sft_single
):
    """Each decoder layer a unit, clipping at every step: two steps, a sharded last.ckpt (one
    file per rank), --ckpt_path last for the third; the losses and hf/ equal three steps of
    one plain process, and scripts/export.py on the checkpoint equals hf/."""
    tmp = two_step_run(strategy, 2, tmp_path_factory, saved_model_dir, sft_data)
    last = tmp / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # sharded: one per rank
    resumed = fit("sft.yaml", tmp, "run", saved_model_dir, sft_data, 2,
                  "--trainer.strategy", strategy, "--ckpt_path", "last")  # fmt: skip
    assert sharded_models(resumed) == 1
    assert_same_training(sft_single, resumed)
    # scripts/export.py consolidates the step-3 checkpoint into the weights hf/ holds
    exported = export_checkpoint(last, tmp / "exported")
    in_fit = resumed.weights
    assert exported.keys() == in_fit.keys()  # a tied head is saved once by both
    for name, value in in_fit.items():
        assert torch.equal(exported[name], value), name


@pytest.mark.heavy
def test_fsdp2_checkpoint_resumes_on_another_process_count(
    tmp_path_factory, saved_model_dir, sft_data, sft_single
):
    """DCP reshards: two steps on 2 processes resume on 1, and two on 1 resume on 2, each
    continuing exactly as three steps of one plain process."""
    # the same global batch: the per-device batch size changes, which resuming allows when told
    allow = ("--allow_changes", "[data.init_args.batch_size]")
    for first, then in ((2, 1), (1, 2)):
        tmp = two_step_run(FSDP2, first, tmp_path_factory, saved_model_dir, sft_data)
        resumed = fit("sft.yaml", tmp, "run", saved_model_dir, sft_data, then,
                      "--trainer.strategy", FSDP2, "--ckpt_path", "last", *allow)  # fmt: skip
        assert f"data position moved from {first} to {then} processes: 4 examples" in resumed.log
        assert sharded_models(resumed, then) == 1
        assert_same_training(sft_single, resumed)


@SHARDED
def test_sharded_dpo_reference_matches_one_process(
    strategy, tmp_path, saved_model_dir, dpo_data, dpo_single
):
    """The frozen reference copy is sharded like the policy: step 0 is ln 2 and the run
    equals one plain process."""
    double = fit("dpo.yaml", tmp_path, "fsdp", saved_model_dir, dpo_data, 2,
                 "--trainer.strategy", strategy)  # fmt: skip
    assert sharded_models(double) == 2  # the policy and its reference
    assert double.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_training(dpo_single, double)


@SHARDED
def test_sharded_dpo_with_precomputed_reference_log_probs(
    strategy, tmp_path, saved_model_dir, dpo_data, dpo_single
):
    """Under FSDP1 a sharded copy, under FSDP2 the sharded policy itself, scores every pair
    before the first step; the training is that of one process with a live reference."""
    double = fit("dpo.yaml", tmp_path, "fsdp-pre", saved_model_dir, dpo_data, 2,
                 "--trainer.strategy", strategy,
                 "--model.precompute_ref_logps", "true")  # fmt: skip
    assert double.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_training(dpo_single, double)
    assert list((tmp_path / "cache").glob("*/ref_logps-*/train"))  # stored with the data


LORA = (
    "--config", str(ROOT / "configs" / "peft" / "lora.yaml"),
    "--model.lora.merge", "true",
    "--model.lora.dropout", "0",  # dropout masks differ between one process and two
    "--model.optimizer.init_args.lr", "0.01",
)  # fmt: skip
MERGED = "merged/model.safetensors"


@pytest.fixture(scope="module")
def lora_single(tmp_path_factory, saved_model_dir, sft_data) -> Run:
    tmp = tmp_path_factory.mktemp("one")
    return fit("sft.yaml", tmp, "one", saved_model_dir, sft_data, 1, *LORA, *FULL, weights=MERGED)


@SHARDED
def test_sharded_lora_with_merge_matches_one_process(
    strategy, tmp_path, saved_model_dir, sft_data, lora_single
):
    """LoRA (frozen and trainable parameters in the same units): the losses and the merged
    export equal one plain process."""
    double = fit("sft.yaml", tmp_path, "two", saved_model_dir, sft_data, 2, *LORA,
                 "--trainer.strategy", strategy, weights=MERGED)  # fmt: skip
    assert sharded_models(double) == 1
    assert_same_training(lora_single, double)
    assert lora_single.losses[0] != lora_single.losses[-1]  # the adapters trained


@SHARDED
def test_sharded_predict_with_an_odd_number_of_prompts(strategy, tmp_path, saved_model_dir):
    """Three prompts on 2 processes, one per batch: the ranks decode in lockstep (sharded
    weights make every forward a collective) and every prompt is written once, in order."""
    answers = ["1 2", "1 2 3", "1 2 3 4"]
    rows = [conversation(f"Count to {a[-1]}.", a) for a in answers]
    log = run_command(
        2, "predict", "--config", str(ROOT / "configs" / "sft.yaml"),
        "--trainer.accelerator", "cpu",
        "--trainer.strategy", strategy, "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.name", "predict",
        "--model.init_args.model_name_or_path", str(saved_model_dir),
        "--model.init_args.from_scratch", "false",
        "--model.init_args.max_new_tokens", "4",
        "--data.init_args.predict_files", str(write_jsonl(tmp_path / "prompts.jsonl", rows)),
        "--data.init_args.val_batch_size", "1",
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert sharded_models(Run([], {}, log, tmp_path)) == 1
    lines = (tmp_path / "runs" / "predict" / "version_0" / "predictions.jsonl").read_text()
    predictions = [json.loads(line) for line in lines.splitlines()]
    assert [p["reference"] for p in predictions] == answers
    assert all(isinstance(p["output"], str) for p in predictions)


@pytest.mark.heavy
def test_fsdp2_preset_settings_train(tmp_path, saved_model_dir, sft_data, sft_single):
    """The shipped preset's settings (bf16 compute over float32 shards, float32 reduction,
    each layer recomputed in backward) with CPU offload: 2 processes train, within bf16's
    precision of one float32 process."""
    preset = yaml.safe_load((ROOT / "configs" / "trainer" / "fsdp2.yaml").read_text())
    settings = {**preset["strategy"]["init_args"], "cpu_offload": True}
    strategy = json.dumps({"class_path": preset["strategy"]["class_path"], "init_args": settings})
    double = fit("sft.yaml", tmp_path, "bf16", saved_model_dir, sft_data, 2,
                 "--trainer.strategy", strategy)  # fmt: skip
    assert "computing in bfloat16, offloaded to the CPU" in double.log
    assert double.losses == pytest.approx(sft_single.losses, rel=2e-2)
    assert double.losses != pytest.approx(sft_single.losses, rel=1e-6)  # bf16 did compute
    assert double.losses[-1] < double.losses[0]
