"""Two CPU processes (DDP over gloo) train exactly like one process with the same global batch.

The data hold exactly one global batch of variable-length examples, so every step of either
run averages over the same examples, whatever the sampler's order: the step losses match only
if the mean is taken over every label token (or pair) across devices, not per device.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, conversation, write_jsonl
from tests.test_e2e import scalars

pytestmark = pytest.mark.slow

STEPS = 3


def fit(
    config: str,
    tmp: Path,
    name: str,
    model_dir: Path,
    data: Path,
    devices: int,
    *extra: str,
    weights: str = "model.safetensors",
):
    per_device = 4 // devices
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        str(ROOT / "configs" / config),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks",
        "[{class_path: src.callbacks.HFExport}]",  # no sample generation
        "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"),
        "--trainer.logger.init_args.name",
        name,
        "--model.init_args.model_name_or_path",
        str(model_dir),
        "--model.init_args.from_scratch",
        "true",
        "--data.init_args.train_files",
        str(data),
        "--data.init_args.val_split",
        "0",
        "--data.init_args.batch_size",
        str(per_device),
        "--data.init_args.cache_dir",
        str(tmp / "cache"),
        *extra,
    ]
    if devices > 1 and "--trainer.strategy" not in extra:  # the last one given wins
        args += ["--trainer.strategy", "ddp"]
    result = subprocess.run(args, capture_output=True, cwd=ROOT, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp / "runs" / name / "version_0"
    losses = [v for _, v in scalars(run, "train/loss")]
    return Run(losses, load_file(run / "hf" / weights), result.stdout + result.stderr)


class Run(NamedTuple):
    losses: list[float]  # train/loss of every step
    weights: dict[str, torch.Tensor]  # the exported model
    log: str  # what the run printed


def assert_same_training(single: Run, double: Run) -> None:
    assert len(single.losses) == len(double.losses) == STEPS
    assert double.losses == pytest.approx(single.losses, rel=2e-5)
    for name, value in single.weights.items():
        assert (double.weights[name] - value).abs().max().item() < 1e-5, name


# DDP that owns gradients as DeepSpeed does, so the modules take the DeepSpeed path
ENGINE = "{class_path: tests.engine_like.EngineLikeDDP}"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    rows = [
        conversation("What is 2 + 3?", "5"),
        conversation("Reverse the words: red fox sleeps", "sleeps fox red"),
        conversation("Uppercase: blue bird", "BLUE BIRD", "Now reverse it.", "BIRD BLUE"),
        conversation("Sort these numbers: 9 4 7 1 3 8 2 6 5", "1 2 3 4 5 6 7 8 9"),
    ]
    return write_jsonl(tmp_path_factory.mktemp("ddp") / "sft.jsonl", rows)


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory, micro_model_dir, sft_data):
    return fit("sft.yaml", tmp_path_factory.mktemp("one"), "one", micro_model_dir, sft_data, 1)


def test_sft_two_processes_match_one(tmp_path, micro_model_dir, sft_data, sft_single):
    double = fit("sft.yaml", tmp_path, "two", micro_model_dir, sft_data, 2)
    assert_same_training(sft_single, double)


def test_engine_style_loss_scaling_matches_under_ddp(
    tmp_path, micro_model_dir, sft_data, sft_single
):
    """The path DeepSpeed takes (loss divided by the global unit count before backward,
    gradients averaged by the engine) gives the same training as one process."""
    double = fit(
        "sft.yaml",
        tmp_path,
        "engine",
        micro_model_dir,
        sft_data,
        2,
        "--trainer.strategy",
        ENGINE,
    )
    assert_same_training(sft_single, double)


PAIRS = [
    {"prompt": "Name a colour.", "chosen": "Blue", "rejected": "A fox runs"},
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5 or maybe 6"},
    {"prompt": "Say hi.", "chosen": "Hi there, friend!", "rejected": "No"},
    {"prompt": "Count to three.", "chosen": "1 2 3", "rejected": "1 2"},
]


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ddp") / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="module")
def dpo_single(tmp_path_factory, micro_model_dir, dpo_data):
    return fit("dpo.yaml", tmp_path_factory.mktemp("one"), "one", micro_model_dir, dpo_data, 1)


def test_dpo_two_processes_match_one(tmp_path, micro_model_dir, dpo_data, dpo_single):
    double = fit("dpo.yaml", tmp_path, "two", micro_model_dir, dpo_data, 2)
    assert_same_training(dpo_single, double)


def test_engine_style_dpo_logs_the_step_mean_not_its_share(
    tmp_path, micro_model_dir, dpo_data, dpo_single
):
    """Under the DeepSpeed path the pair count is reduced over devices before backward; the
    logged loss must stay the mean over the step's pairs (ln 2 at step 0), not 1/world of it."""
    double = fit(
        "dpo.yaml",
        tmp_path,
        "engine",
        micro_model_dir,
        dpo_data,
        2,
        "--trainer.strategy",
        ENGINE,
    )
    assert double.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_training(dpo_single, double)


FSDP = (
    "{class_path: src.strategies.LayerFSDPStrategy, "
    "init_args: {sharding_strategy: FULL_SHARD, state_dict_type: sharded}}"
)
FSDP2 = "{class_path: src.strategies.LayerFSDP2Strategy}"


def sharded_models(run: Run, processes: int = 2) -> int:
    """How many models the run sharded over ``processes`` (as the strategies report it)."""
    return run.log.count(f"units sharded over {processes} processes") + run.log.count(
        f"the root) sharded over {processes} processes"
    )


SHARDED = pytest.mark.parametrize(
    "strategy", [pytest.param(FSDP, id="fsdp1"), pytest.param(FSDP2, id="fsdp2")]
)


@SHARDED
def test_fsdp_two_processes_match_one_with_norm_clipping(
    strategy, tmp_path, micro_model_dir, sft_data
):
    """FSDP1 and FSDP2 on 2 CPU processes (gloo), each decoder layer a unit, with a clipping
    threshold that bites at every step: the same losses and exported weights as one plain
    process."""
    clip = ("--trainer.gradient_clip_val", "0.05")
    single = fit("sft.yaml", tmp_path / "one", "one", micro_model_dir, sft_data, 1, *clip)
    norms = [
        v for _, v in scalars(tmp_path / "one" / "runs" / "one" / "version_0", "train/grad_norm")
    ]
    assert len(norms) == STEPS and min(norms) > 0.05  # clipped at every step
    double = fit(
        "sft.yaml",
        tmp_path / "two",
        "two",
        micro_model_dir,
        sft_data,
        2,
        *clip,
        "--trainer.strategy",
        strategy,
    )
    assert sharded_models(double) == 1
    assert_same_training(single, double)


@SHARDED
def test_fsdp_dpo_with_a_sharded_reference_matches_one_process(
    strategy, tmp_path, micro_model_dir, dpo_data, dpo_single
):
    """The frozen reference copy is sharded like the policy: step 0 is ln 2 and the run
    equals one plain process."""
    double = fit(
        "dpo.yaml", tmp_path, "fsdp", micro_model_dir, dpo_data, 2, "--trainer.strategy", strategy
    )
    assert sharded_models(double) == 2  # the policy and its reference
    assert double.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_training(dpo_single, double)


@SHARDED
def test_fsdp_dpo_with_precomputed_reference_log_probs(
    strategy, tmp_path, micro_model_dir, dpo_data, dpo_single
):
    """Under FSDP1 a sharded copy, under FSDP2 the sharded policy itself, scores every pair
    before the first step; the training is that of one process with a live reference."""
    double = fit(
        "dpo.yaml",
        tmp_path,
        "fsdp-pre",
        micro_model_dir,
        dpo_data,
        2,
        "--trainer.strategy",
        strategy,
        "--model.precompute_ref_logps",
        "true",
    )
    assert double.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_training(dpo_single, double)
    assert list((tmp_path / "cache").glob("*/ref_logps-*/train"))  # stored with the data


@SHARDED
def test_fsdp_sharded_checkpoint_resumes_exactly(
    strategy, tmp_path, micro_model_dir, sft_data, sft_single
):
    """Two steps, a sharded last checkpoint (one file per rank), then --ckpt_path last for the
    third: the same losses and weights as three steps of one plain process."""
    common = ("--trainer.strategy", strategy)
    fit("sft.yaml", tmp_path / "b", "run", micro_model_dir, sft_data, 2, *common,
        "--trainer.max_steps", "2")  # fmt: skip
    last = tmp_path / "b" / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # sharded: one per rank
    resumed = fit("sft.yaml", tmp_path / "b", "run", micro_model_dir, sft_data, 2, *common,
                  "--ckpt_path", "last")  # fmt: skip
    assert sharded_models(resumed) == 1
    assert_same_training(sft_single, resumed)
    # scripts/export.py consolidates the sharded checkpoint into the weights hf/ holds
    out = tmp_path / "exported"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export.py"), str(last), "--out", str(out)],
        capture_output=True,
        cwd=ROOT,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    exported, in_fit = load_file(out / "model.safetensors"), dict(resumed.weights)
    tied = in_fit.pop("lm_head.weight", None)  # tied: the in-fit export writes it out too
    if tied is not None:
        assert torch.equal(tied, in_fit["model.embed_tokens.weight"])
    assert exported.keys() == in_fit.keys()
    for name, value in in_fit.items():
        assert torch.equal(exported[name], value), name


@SHARDED
def test_fsdp_lora_with_merge_matches_one_process(strategy, tmp_path, micro_model_dir, sft_data):
    """LoRA under FSDP (frozen and trainable parameters in the same units): the losses and the
    merged export equal one plain process."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "base"  # a model with weights, as from the hub
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir)).save_pretrained(
        base
    )
    lora = (
        "--config",
        str(ROOT / "configs" / "peft" / "lora.yaml"),
        "--model.from_scratch",
        "false",
        "--model.lora.merge",
        "true",
        "--model.lora.dropout",
        "0",  # dropout masks differ between one process and two
        "--model.optimizer.init_args.lr",
        "0.01",
    )
    merged = "merged/model.safetensors"
    single = fit("sft.yaml", tmp_path / "one", "one", base, sft_data, 1, *lora, weights=merged)
    double = fit(
        "sft.yaml", tmp_path / "two", "two", base, sft_data, 2, *lora,
        "--trainer.strategy", strategy, weights=merged,
    )  # fmt: skip
    assert sharded_models(double) == 1
    assert_same_training(single, double)
    assert single.losses[0] != single.losses[-1]  # the adapters trained


def test_fsdp2_checkpoint_resumes_on_another_process_count(
    tmp_path, micro_model_dir, sft_data, sft_single
):
    """DCP reshards: two steps on 2 processes resume on 1, and two on 1 resume on 2, each
    continuing exactly as three steps of one plain process."""
    common = ("--trainer.strategy", FSDP2)
    for first, then in ((2, 1), (1, 2)):
        tmp = tmp_path / f"{first}to{then}"
        fit("sft.yaml", tmp, "run", micro_model_dir, sft_data, first, *common,
            "--trainer.max_steps", "2")  # fmt: skip
        # the same global batch: the per-device batch size changes, which resuming allows
        # when told
        allow = ("--allow_changes", "[data.init_args.batch_size]")
        resumed = fit("sft.yaml", tmp, "run", micro_model_dir, sft_data, then, *common,
                      "--ckpt_path", "last", *allow)  # fmt: skip
        assert f"data position moved from {first} to {then} processes: 4 examples" in resumed.log
        assert sharded_models(resumed, then) == 1
        assert_same_training(sft_single, resumed)


@SHARDED
def test_sharded_predict_with_an_odd_number_of_prompts(strategy, tmp_path, micro_model_dir):
    """Three prompts on 2 processes, one per batch: the ranks decode in lockstep (sharded
    weights make every forward a collective) and every prompt is written once, in order."""
    prompts = [
        conversation(f"Count to {n}.", " ".join(map(str, range(1, n + 1)))) for n in (2, 3, 4)
    ]
    files = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    args = [
        sys.executable, str(ROOT / "train.py"), "predict",
        "--config", str(ROOT / "configs" / "sft.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", strategy,
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.name", "predict",
        "--model.init_args.model_name_or_path", str(micro_model_dir),
        "--model.init_args.from_scratch", "true",
        "--model.init_args.max_new_tokens", "4",
        "--data.init_args.predict_files", str(files),
        "--data.init_args.val_batch_size", "1",
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, cwd=ROOT, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sharded_models(Run([], {}, result.stdout + result.stderr)) == 1
    lines = (tmp_path / "runs" / "predict" / "version_0" / "predictions.jsonl").read_text()
    rows = [json.loads(line) for line in lines.splitlines()]
    assert [r["reference"] for r in rows] == ["1 2", "1 2 3", "1 2 3 4"]
    assert all(isinstance(r["output"], str) for r in rows)
