"""GRPO on 2 CPU processes (FSDP2, gloo) trains exactly like 1 process on the same global
batch, given fixed completions: the loss is the token mean over both devices' completions
(not a mean of per-device means), and the reference for the KL term is sharded like the
policy. Completions of different lengths on the two ranks make the difference visible."""

from __future__ import annotations

import pytest

from tests.conftest import ASSETS, write_jsonl
from tests.test_ddp import (  # noqa: F401 - fixtures
    FSDP2,
    FULL,
    assert_same_training,
    fit,
    saved_model_dir,
    sharded_models,
)
from tests.test_e2e import scalars

pytestmark = pytest.mark.slow

ROWS = [
    {"prompt": "Add 3 and 4.", "answer": "7", "fixed": ["7", "8", "7", "77"], "task": "add"},
    {"prompt": "Add 1 and 1.", "answer": "2", "fixed": ["2", "2", "3", "22 2 2"], "task": "add"},
    {
        "prompt": "Count: a b c",
        "answer": "3",
        "fixed": ["3", "three words", "4", "3"],
        "task": "count",
    },
    {"prompt": "Count: a", "answer": "1", "fixed": ["1 1 1 1 1 1", "1", "0", "2"], "task": "count"},
]
GRPO = (
    "--model.class_path", "tests.grpo_fixed.FixedCompletionsGRPO",
    "--model.init_args.num_generations", "4", "--model.init_args.max_new_tokens", "8",
    "--model.init_args.beta", "0.04", "--model.init_args.optimizer.init_args.lr", "0.01",
    "--model.init_args.warmup", "0", "--data.init_args.val_files", "null",
)  # fmt: skip


def test_grpo_two_sharded_processes_match_one(tmp_path, saved_model_dir):
    data = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    tokenizer = ("--data.init_args.tokenizer", str(ASSETS))
    single = fit("grpo.yaml", tmp_path / "one", "one", saved_model_dir, data, 1, *GRPO,
                 *tokenizer, *FULL)  # fmt: skip
    double = fit("grpo.yaml", tmp_path / "two", "two", saved_model_dir, data, 2, *GRPO,
                 *tokenizer, "--trainer.strategy", FSDP2)  # fmt: skip
    assert sharded_models(double) == 2  # the policy and its reference
    assert_same_training(single, double)
    kl = [v for _, v in scalars(double.path, "train/kl")]
    assert kl[0] == 0 and kl[-1] > 0  # the reference entered the loss after the first update
    assert scalars(double.path, "train/reward")[0][1] == pytest.approx(7 / 16)


def test_grpo_samples_in_lockstep_under_fsdp2(tmp_path, saved_model_dir):
    """Rank 0 stops sampling after 2 tokens, rank 1 after 6: every forward of the sharded
    model is a collective, so the ranks decode in lockstep until both are done
    (synced_gpus; without it rank 1 would wait forever for rank 0's gathers); the greedy
    validation too. The fit finishes and logs its rewards."""
    data = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    run = fit(
        "grpo.yaml", tmp_path / "two", "two", saved_model_dir, data, 2,
        "--model.class_path", "tests.grpo_fixed.UnevenLengthsGRPO",
        "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "6",
        "--data.init_args.tokenizer", str(ASSETS), "--data.init_args.val_files", str(data),
        "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3",
        "--model.init_args.rewards", "[tests.grpo_fixed.letter_e]",
        "--trainer.strategy", FSDP2,
    )  # fmt: skip
    assert sharded_models(run) == 1
    assert len(scalars(run.path, "train/reward")) == 3
    lengths = [v for _, v in scalars(run.path, "train/completion_length")]
    assert all(1 <= v <= 4 for v in lengths)  # the mean of up to 2 and up to 6
    assert len(scalars(run.path, "val/reward")) == 1  # after the last step
