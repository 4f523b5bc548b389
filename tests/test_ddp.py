"""Two CPU processes (gloo) train exactly like one process with the same global batch, under
every strategy: DDP, FSDP2, FSDP1 and DeepSpeed ZeRO-2/3.

The data hold exactly one global batch of variable-length examples, so every step of either
run averages over the same examples, whatever the sampler's order: the step losses match only
if the mean is taken over every label token (or pair) across devices, not per device. Every
run starts from the same saved weights and clips gradients at a threshold that bites at
every step, so clipping (over the shards, where there are shards) is checked everywhere.
The one-process baselines run the full-logits head (``lm_head: full``) and every other run
the lean head (the default), so the lean head under each sharder, gathering the sharded
head weight through its forward, is checked against the plain computation.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, conversation, write_jsonl
from tests.test_e2e import scalars

pytestmark = pytest.mark.slow

STEPS = 3
CLIP = 0.05  # below every step's gradient norm here
FULL = ("--model.init_args.lm_head", "full")  # the baselines' head path
WITHOUT_LM_HEAD = {"reward.yaml"}  # objectives that run another head


class Run(NamedTuple):
    losses: list[float]  # train/loss of every step
    weights: dict[str, torch.Tensor]  # the exported model
    log: str  # what the run printed
    path: Path  # the run directory


def run_command(processes: int, *args: str) -> str:
    """``train.py <args>`` on ``processes`` processes: what it printed; the test fails with
    its stderr if it fails. Several are started at once by torchrun (as on a cluster), which
    imports in parallel what Lightning's own launcher would import one process after another.
    """
    launcher = []
    if processes > 1:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                    f"--master_port={port}"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, *launcher, str(ROOT / "train.py"), *args,
         "--trainer.devices", str(processes)],
        capture_output=True, cwd=ROOT, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def fit(
    config: str,
    tmp: Path,
    name: str,
    model_dir: Path,
    data: Path,
    devices: int,
    *extra: str,
    weights: str = "model.safetensors",
) -> Run:
    log = run_command(
        devices, "fit", "--config", str(ROOT / "configs" / config),
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.gradient_clip_val", str(CLIP),
        "--trainer.callbacks", "[{class_path: src.callbacks.HFExport}]",  # no sample generation
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--trainer.logger.init_args.name", name,
        "--model.init_args.model_name_or_path", str(model_dir),
        "--model.init_args.from_scratch", "false",
        "--data.init_args.train_files", str(data), "--data.init_args.val_split", "0",
        "--data.init_args.batch_size", str(4 // devices),
        "--data.init_args.cache_dir", str(tmp / "cache"),
        *extra,
        *(("--trainer.strategy", "ddp") if devices > 1 and "--trainer.strategy" not in extra
          else ()),
    )  # fmt: skip
    head = "full" if "full" in extra else "lean"
    if config not in WITHOUT_LM_HEAD:
        assert f"[head] {head}:" in log  # which head path ran
    run = tmp / "runs" / name / "version_0"
    losses = [v for _, v in scalars(run, "train/loss")]
    return Run(losses, load_file(run / "hf" / weights), log, run)


def assert_same_training(single: Run, double: Run) -> None:
    assert len(single.losses) == len(double.losses) == STEPS
    assert double.losses == pytest.approx(single.losses, rel=2e-5)
    for name, value in single.weights.items():
        assert (double.weights[name] - value).abs().max().item() < 1e-5, name


def export_checkpoint(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """``scripts/export.py`` on a checkpoint: the weights it writes."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export.py"), str(checkpoint), "--out", str(out)],
        capture_output=True, cwd=ROOT, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(out / "model.safetensors")


def sharded_models(run: Run, processes: int = 2) -> int:
    """How many models the run sharded over ``processes``, each decoder layer of the micro
    model (2) and the root a unit, as the strategies report it."""
    return run.log.count(f"[fsdp] 3 units sharded over {processes} processes") + run.log.count(
        f"[fsdp2] 3 units (LlamaDecoderLayer and the root) sharded over {processes} processes"
    )


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory, micro_model_dir) -> Path:
    """The micro model with saved weights, as from the hub: runs that start from it begin
    from the same weights whatever the strategy initialises under (ZeRO-3 partitions them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(micro_model_dir)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


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
def sft_single(tmp_path_factory, saved_model_dir, sft_data) -> Run:
    single = fit(
        "sft.yaml", tmp_path_factory.mktemp("one"), "one", saved_model_dir, sft_data, 1, *FULL
    )
    norms = [v for _, v in scalars(single.path, "train/grad_norm")]
    assert len(norms) == STEPS and min(norms) > CLIP  # clipped at every step
    return single


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
def dpo_single(tmp_path_factory, saved_model_dir, dpo_data) -> Run:
    tmp = tmp_path_factory.mktemp("one")
    return fit("dpo.yaml", tmp, "one", saved_model_dir, dpo_data, 1, *FULL)


# ------------------------------------------------------------------------------------- DDP


def test_sft_two_processes_match_one(tmp_path, saved_model_dir, sft_data, sft_single):
    double = fit("sft.yaml", tmp_path, "two", saved_model_dir, sft_data, 2)
    assert_same_training(sft_single, double)


def test_dpo_two_processes_match_one(tmp_path, saved_model_dir, dpo_data, dpo_single):
    double = fit("dpo.yaml", tmp_path, "two", saved_model_dir, dpo_data, 2)
    assert double.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_training(dpo_single, double)


def test_reward_model_two_sharded_processes_match_one(tmp_path, saved_model_dir, dpo_data):
    """The reward model's head and pair losses under FSDP2 on 2 processes (each with 2 of the
    4 pairs, one with a margin) train as one plain process with all 4."""
    rows = [{**pair, "margin": 0.5 * (i % 2)} for i, pair in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "margins.jsonl", rows)
    single = fit("reward.yaml", tmp_path / "one", "one", saved_model_dir, data, 1)
    double = fit("reward.yaml", tmp_path / "two", "two", saved_model_dir, data, 2,
                 "--trainer.strategy", FSDP2)  # fmt: skip
    assert sharded_models(double) == 1
    assert "score.weight" in single.weights
    assert_same_training(single, double)
    assert single.losses[0] != single.losses[-1]


def test_kto_two_sharded_processes_match_one(tmp_path, saved_model_dir):
    """KTO under FSDP2 on 2 processes: the KL estimate is taken over the mismatched rows of
    both (reduced across devices), so every step equals one plain process with all 4 rows;
    step 0 is 0.5 (every reward and the KL 0), the frozen reference copy sharded too."""
    # three desirable rows raise answers' log-probs after any prompt: the KL estimate over
    # the mismatched pairs grows above 0 (it is clamped there) and enters every loss
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in PAIRS]
    rows[3] = {"prompt": PAIRS[3]["prompt"], "completion": PAIRS[3]["rejected"], "label": False}
    data = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    lr = ("--model.optimizer.init_args.lr", "0.01")  # far enough from the reference for a KL
    single = fit("kto.yaml", tmp_path / "one", "one", saved_model_dir, data, 1, *FULL, *lr)
    double = fit("kto.yaml", tmp_path / "two", "two", saved_model_dir, data, 2, *lr,
                 "--trainer.strategy", FSDP2)  # fmt: skip
    assert sharded_models(double) == 2  # the policy and its reference
    assert double.losses[0] == pytest.approx(0.5, abs=1e-6)
    assert_same_training(single, double)
    kl = [v for _, v in scalars(double.path, "train/kl")]
    assert kl[0] == 0 and min(kl[1:]) > 0.5  # the reduced estimate entered the losses


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, micro_model_dir) -> Path:
    """Other weights than the student's, saved with the tokenizer, as a trained teacher."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir)).save_pretrained(
        path
    )
    AutoTokenizer.from_pretrained(micro_model_dir).save_pretrained(path)
    return path


def test_distillation_two_sharded_processes_match_one(
    tmp_path, saved_model_dir, teacher_dir, sft_data
):
    """Distillation under FSDP2 on 2 processes, the teacher sharded like the student (its
    label-position logits computed inside its own forward): every step and the export equal
    one plain process on the full-logits path."""
    teacher = ("--model.teacher_name_or_path", str(teacher_dir))
    single = fit("distill.yaml", tmp_path / "one", "one", saved_model_dir, sft_data, 1,
                 *teacher, *FULL)  # fmt: skip
    double = fit("distill.yaml", tmp_path / "two", "two", saved_model_dir, sft_data, 2,
                 *teacher, "--trainer.strategy", FSDP2)  # fmt: skip
    assert sharded_models(double) == 2  # the student and its teacher
    assert_same_training(single, double)
    assert single.losses[0] > 0.01  # the teacher differs: something to distil


# ----------------------------------------------------------------------------- FSDP2, FSDP1

FSDP = (
    "{class_path: src.strategies.LayerFSDPStrategy, "
    "init_args: {sharding_strategy: FULL_SHARD, state_dict_type: sharded}}"
)
FSDP2 = "{class_path: src.strategies.LayerFSDP2Strategy}"
SHARDED = pytest.mark.parametrize(
    "strategy", [pytest.param(FSDP, id="fsdp1"), pytest.param(FSDP2, id="fsdp2")]
)
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


# ---------------------------------------------------------------------------------- DeepSpeed

# the shipped ZeRO configs with every parameter partitioned (the presets keep tensors under
# a million elements whole on each rank, which would be every tensor here)
ZERO = pytest.mark.parametrize("zero", ["zero2", "zero3", "zero3_offload"])


def deepspeed_strategy(zero: str, tmp: Path) -> str:
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    config = json.loads((ROOT / "configs" / "deepspeed" / f"{zero}.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / f"{zero}.json"
    path.write_text(json.dumps(config))
    return f"{{class_path: tests.cpu_deepspeed.CPUDeepSpeed, init_args: {{config: {path}}}}}"


@pytest.mark.parametrize(
    "zero, resume", [("zero2", False), ("zero3", True), ("zero3_offload", False)]
)
def test_deepspeed_sft_matches_one_process(
    zero, resume, tmp_path, saved_model_dir, sft_data, sft_single
):
    """ZeRO-2, ZeRO-3 and ZeRO-3 with offload on 2 CPU processes, clipping by the engine:
    the losses and the exported weights equal three steps of one plain process, also with two
    steps, a DeepSpeed checkpoint and --ckpt_path last for the third (ZeRO-3, whose
    checkpoint holds partitioned weights); scripts/export.py on the last checkpoint (ZeRO-2:
    whole weights, ZeRO-3: partitions) equals hf/."""
    common = ("--trainer.strategy", deepspeed_strategy(zero, tmp_path))
    if resume:
        fit("sft.yaml", tmp_path, "run", saved_model_dir, sft_data, 2, *common,
            "--trainer.max_steps", "2")  # fmt: skip
        common += ("--ckpt_path", "last")
    double = fit("sft.yaml", tmp_path, "run", saved_model_dir, sft_data, 2, *common)
    assert "CPUDeepSpeed owns the gradients" in double.log
    assert_same_training(sft_single, double)
    last = tmp_path / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    partitions = {f.name for f in (last / "checkpoint").glob("zero_pp_rank_*")}
    states = ["optim"] + (["model"] if zero.startswith("zero3") else [])  # ZeRO-3: weights too
    assert partitions == {
        f"zero_pp_rank_{r}_mp_rank_00_{s}_states.pt" for r in (0, 1) for s in states
    }
    exported = export_checkpoint(last, tmp_path / "exported")
    for name, value in exported.items():
        assert (double.weights[name] - value).abs().max().item() < 1e-6, name


@ZERO
def test_deepspeed_dpo_matches_one_process(zero, tmp_path, saved_model_dir, dpo_data, dpo_single):
    """DPO under ZeRO-2 (a frozen reference copy on each rank) and ZeRO-3 (no copy can be
    built: the initial policy precomputes the reference log-probs): step 0 logs ln 2, not a
    share of it (the engine path reduces the pair count before backward), and the run
    equals one plain process."""
    extra = ("--model.precompute_ref_logps", "true") if zero.startswith("zero3") else ()
    double = fit("dpo.yaml", tmp_path, "ds", saved_model_dir, dpo_data, 2, *extra,
                 "--trainer.strategy", deepspeed_strategy(zero, tmp_path))  # fmt: skip
    assert double.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_training(dpo_single, double)
