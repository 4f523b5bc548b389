"""Two CPU processes (gloo) train exactly like one process with the same global batch, under
every strategy: DDP and each objective here, FSDP2 and FSDP1 in ``test_fsdp_runs.py``,
DeepSpeed ZeRO-2/3 in ``test_deepspeed_runs.py`` (files of their own, so that the test
processes share them out).

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

import math
import socket
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
CLIP = 0.05  # below every step's gradient norm here
FULL = ("--model.init_args.lm_head", "full")  # the baselines' head path
WITHOUT_LM_HEAD = {"reward.yaml"}  # objectives that run another head
# the sharders as --trainer.strategy values
FSDP = (
    "{class_path: src.strategies.LayerFSDPStrategy, "
    "init_args: {sharding_strategy: FULL_SHARD, state_dict_type: sharded}}"
)
FSDP2 = "{class_path: src.strategies.LayerFSDP2Strategy}"
# FSDP1, kept for one release, runs with make test-all
SHARDED = pytest.mark.parametrize(
    "strategy",
    [pytest.param(FSDP, id="fsdp1", marks=pytest.mark.heavy), pytest.param(FSDP2, id="fsdp2")],
)


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


@pytest.mark.heavy
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


@pytest.mark.heavy
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
