"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes equal one plain process (SFT with resume and
export, DPO); the runs and checks of ``test_ddp.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_ddp import (  # noqa: F401 (fixtures among them)
    assert_same_training,
    dpo_data,
    dpo_single,
    export_checkpoint,
    fit,
    saved_model_dir,
    sft_data,
    sft_single,
)

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

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


@pytest.mark.parametrize("zero", ["zero2", "zero3"])  # offload: the SFT test covers it
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
