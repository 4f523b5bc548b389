"""GRPO: the rollout (what the sampler drew is what the loss scores), the loss of fixed
completions by hand (value and gradient), the prompt data, repeated rounds for
num_iterations, the metrics and completion table of a fit, and exact resume.

The arithmetic (advantages, the clipped loss, agreement with TRL) is in
``test_policy_gradient.py``; the reward functions in ``test_rewards.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.cli import cli_main
from src.datamodules import DataError, PromptDataModule
from src.datamodules.prompts import PromptCollator, RepeatedRounds
from src.modules import GRPOModule
from src.modules.grpo import _completion_lengths, _sequences
from src.modules.policy_gradient import STD_EPS
from tests.conftest import ROOT, write_jsonl
from tests.grpo_fixed import FixedCompletionsGRPO
from tests.test_e2e import scalars

EXACT = "src.modules.rewards.ExactMatch"


def module(model_dir, cls=GRPOModule, **kwargs) -> GRPOModule:
    settings = {"num_generations": 4, "max_new_tokens": 6, "rewards": [EXACT]} | kwargs
    m = cls(model_name_or_path=str(model_dir), from_scratch=True, **settings)
    m.configure_model()
    return m


def prompt_batch(m: GRPOModule, rows: list[dict]) -> dict:
    """Rows of ``prompt`` (a user message) and fields, as the data module batches them."""
    data = PromptDataModule(tokenizer=str(m.tokenizer_name_or_path), max_length=64)
    data.__dict__["tokenizer"] = m.tokenizer
    columns, _ = data.encode_chunk(
        [data.to_example(_record(r), "auto") for r in rows], ["row"] * len(rows)
    )
    names = list(columns)
    return PromptCollator(m.tokenizer.pad_token_id)(
        [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    )


def _record(row: dict):
    from src.datamodules.records import Record

    return Record(row, "row")


# ====================================================================== rollout


def test_completion_lengths_end_at_the_first_stop_token():
    ids = torch.tensor([[5, 2, 9, 2], [5, 6, 7, 8], [2, 0, 0, 0], [4, 3, 2, 3]])
    assert _completion_lengths(ids, [2, 3]).tolist() == [2, 4, 1, 2]


def test_sequences_drop_the_left_padding_and_label_only_the_completion():
    prompt_ids = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    completions = torch.tensor([[31, 2, 0], [41, 42, 43]])
    out = _sequences(prompt_ids, prompt_mask, completions, torch.tensor([2, 3]), 0)
    assert out["input_ids"].tolist() == [[11, 12, 31, 2, 0, 0, 0], [21, 22, 23, 24, 41, 42, 43]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert out["labels"].tolist() == [
        [-100, -100, 31, 2, -100, -100, -100],
        [-100, -100, -100, -100, 41, 42, 43],
    ]


def test_the_loss_scores_the_tokens_with_the_probabilities_they_were_sampled_from(
    micro_model_dir,
):
    """generate()'s own logits of each sampled step (left-padded prompts of different
    lengths, temperature 0.7) give the same log-probabilities and entropies as the right-
    padded rows the loss runs: the policy is scored at the positions the sampler saw."""
    m = module(micro_model_dir, temperature=0.7)
    rows = [{"prompt": "Add 3 and 4.", "answer": "7"}, {"prompt": "Count: a b c d e f"}]
    batch = prompt_batch(m, rows)
    assert batch["prompt_mask"][0].sum() < batch["prompt_mask"][1].sum()  # left padding
    torch.manual_seed(0)
    m.model.eval()
    out = m.model.generate(
        input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], do_sample=True,
        temperature=0.7, top_k=None, max_new_tokens=6, pad_token_id=m.tokenizer.pad_token_id,
        eos_token_id=m.stop_ids, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    new = out.sequences[:, batch["prompt_ids"].shape[1] :]
    lengths = _completion_lengths(new, m.stop_ids)
    logprobs = torch.log_softmax(torch.stack(out.logits, 1).float() / 0.7, -1)
    drawn = logprobs.gather(2, new[..., None]).squeeze(2)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    keep = torch.arange(new.shape[1])[None] < lengths[:, None]
    inputs = _sequences(batch["prompt_ids"], batch["prompt_mask"], new, lengths, 0)
    stats = m.token_stats(inputs)
    assert stats.shape == (int(lengths.sum()), 2)
    torch.testing.assert_close(stats[:, 0], drawn[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(stats[:, 1], entropy[keep], atol=1e-5, rtol=0)


# ======================================================== fixed completions by hand

COMPLETIONS = [["7", "8", "7", "77"], ["3", "3", "3", "3"]]
ROWS = [
    {"prompt": "Add 3 and 4.", "answer": "7", "fixed": COMPLETIONS[0]},
    {"prompt": "How many words are in: red sun sets", "answer": "3", "fixed": COMPLETIONS[1]},
]


def test_loss_of_fixed_completions_equals_the_hand_computation(micro_model_dir):
    """Rewards 1 0 1 0 and 1 1 1 1: advantages +-0.5 / (std + eps) and 0 (a zero-variance
    group); with one update per generation the ratio is 1, so the loss is the token mean of
    -A over the completion tokens and its gradient -sum_i A_i sum_t grad log p_t / N,
    computed here from each row's full logits alone."""
    m = module(micro_model_dir, FixedCompletionsGRPO)
    batch = prompt_batch(m, ROWS)
    m.zero_grad()
    terms = m.loss_terms(batch)
    (terms.loss_sum / terms.count).backward()
    grads = {n: p.grad.clone() for n, p in m.model.named_parameters()}

    std = math.sqrt(4 * 0.25 / 3)  # unbiased, as TRL
    advantages = [0.5 / (std + STD_EPS), -0.5 / (std + STD_EPS)] * 2 + [0.0] * 4
    m.zero_grad()
    total, tokens, sums = 0.0, 0, {}
    for i, text in enumerate(c for group in COMPLETIONS for c in group):
        prompt = batch["prompt_ids"][i // 4][batch["prompt_mask"][i // 4].bool()].tolist()
        completion = m.tokenizer(text, add_special_tokens=False)["input_ids"]
        completion += [m.tokenizer.eos_token_id]
        ids = torch.tensor([prompt + completion])
        logprobs = torch.log_softmax(m.model(input_ids=ids).logits[0, len(prompt) - 1 : -1], -1)
        logp = logprobs.gather(1, torch.tensor(completion)[:, None]).sum()
        total = total - advantages[i] * logp  # the ratio is 1: its value times A
        tokens += len(completion)
        sums[i] = len(completion)
    (total / tokens).backward()
    assert terms.count.item() == tokens
    assert (terms.loss_sum / terms.count).item() == pytest.approx(
        -sum(a * sums[i] for i, a in enumerate(advantages)) / tokens, abs=1e-6
    )
    for name, p in m.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert terms.sums["reward"].item() == 6 and terms.counts["reward"].item() == 8
    assert terms.sums["rewards/exact_match"].item() == 6
    assert terms.sums["frac_reward_zero_std"].item() == 1  # of 2 groups
    assert terms.sums["reward_std"].item() == pytest.approx(std, abs=1e-6)
    assert terms.sums["completion_length"].item() == tokens
    assert terms.sums["clip_ratio/low"].item() == terms.sums["clip_ratio/high"].item() == 0


def test_a_second_update_on_the_same_completions_uses_the_recorded_log_probs(micro_model_dir):
    """num_iterations 2: the first pass records the policy's log-probs; after an update the
    ratios on the same completions are no longer 1 and the clipped tokens are counted."""
    m = module(micro_model_dir, FixedCompletionsGRPO, num_iterations=2, epsilon=0.01)
    batch = prompt_batch(m, ROWS)
    FixedCompletionsGRPO.calls = 0
    m._batch_idx = 0
    first = m.loss_terms(batch)
    rollout = m._rollouts[0]
    torch.testing.assert_close(rollout.old_logps, m.token_stats(rollout.inputs)[:, 0].detach())
    (first.loss_sum / first.count).backward()
    with torch.no_grad():
        for p in m.model.parameters():
            p -= 0.5 * p.grad  # a large step: some ratios leave [0.99, 1.01]
    m._batch_idx = 1
    second = m.loss_terms(batch)
    assert FixedCompletionsGRPO.calls == 1  # generated once for both passes
    clipped = second.sums["clip_ratio/low"] + second.sums["clip_ratio/high"]
    assert first.sums["clip_ratio/low"] + first.sums["clip_ratio/high"] == 0
    assert clipped > 0
    other = dict(batch, prompt_ids=batch["prompt_ids"].flip(0))
    with pytest.raises(RuntimeError, match="prompts of a repeated batch differ"):
        m.loss_terms(other)


# ======================================================================== data


def test_prompt_rows_in_every_shape_keep_their_fields(tmp_path, micro_model_dir):
    rows = [
        {"prompt": "Add 1 and 2.", "answer": "3", "task": "add"},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Count: a b"}], "answer": 2},
        {"messages": [{"role": "user", "content": "Uppercase: ox"},
                      {"role": "assistant", "content": "OX"}]},
        {"question": "Add 5 and 5.", "solution": "10"},
    ]  # fmt: skip
    files = write_jsonl(tmp_path / "p.jsonl", rows[:3])
    other = write_jsonl(tmp_path / "q.jsonl", rows[3:])
    data = PromptDataModule(
        tokenizer=str(micro_model_dir),
        train_files=[str(files), {"path": str(other),
                                  "columns": {"prompt": "question", "answer": "solution"}}],
        val_split=0, max_length=64, cache_dir=None,
    )  # fmt: skip
    data.setup("fit")
    batch = data.collator()([data.datasets["train"][i] for i in range(4)])
    assert batch["prompts"] == ["Add 1 and 2.", "Count: a b", "Uppercase: ox", "Add 5 and 5."]
    assert [f.get("answer") for f in batch["fields"]] == ["3", 2, "OX", "10"]
    assert batch["fields"][0]["task"] == "add"
    mask = batch["prompt_mask"]
    assert (mask[:, -1] == 1).all() and (mask.sum(1) < mask.shape[1]).any()  # left-padded
    text = data.tokenizer.decode(batch["prompt_ids"][1][mask[1].bool()])
    assert text.endswith(
        data.tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
        ).split("x")[-1]
    )  # fmt: skip  - ends with the generation prompt


def test_a_prompt_longer_than_max_prompt_length_is_dropped_and_counted(tmp_path, micro_model_dir):
    rows = [{"prompt": "Add 1 and 2.", "answer": "3"}, {"prompt": "word " * 80, "answer": "80"}]
    data = PromptDataModule(
        tokenizer=str(micro_model_dir), train_files=str(write_jsonl(tmp_path / "p.jsonl", rows)),
        val_split=0, max_length=64, cache_dir=None,
    )  # fmt: skip
    data.setup("fit")
    assert len(data.datasets["train"]) == 1
    assert data.stats["train"].dropped == {"with a prompt longer than max_prompt_length 32": 1}


def test_repeated_rounds_serve_each_rank_its_rows_again_and_reshuffle_each_epoch():
    rounds = RepeatedRounds(list(range(10)), round_rows=4, repeats=2, seed=0)
    assert len(rounds) == 16  # 2 full rounds of 4, twice each; rows 9 and 10 left out
    order = [rounds[i] for i in range(16)]
    assert order[0:4] == order[4:8] and order[8:12] == order[12:16]
    assert len(set(order[0:4] + order[8:12])) == 8
    for rank in range(2):  # as a distributed sampler splits them, batches of 2
        mine = order[rank::2]
        assert mine[0:2] == mine[2:4] and mine[4:6] == mine[6:8]
    rounds.epoch = 1
    assert [rounds[i] for i in range(16)] != order
    with pytest.raises(DataError, match="do not fill one optimizer step of 12"):
        RepeatedRounds(list(range(10)), round_rows=12, repeats=2, seed=0)


# ========================================================================= fits


def fit_args(tmp_path, model_dir, data, steps, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "grpo.yaml"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--checkpoint.every_n_train_steps", "1",
        "--model.init_args.model_name_or_path", str(model_dir),
        "--model.init_args.from_scratch", "true",
        "--model.init_args.num_generations", "4", "--model.init_args.max_new_tokens", "6",
        "--model.init_args.log_completions_every_n_steps", "2",
        "--data.init_args.tokenizer", str(model_dir),
        "--data.init_args.train_files", str(data), "--data.init_args.val_files", str(data),
        "--data.init_args.batch_size", "2", "--data.init_args.cache_dir", str(tmp_path / "c"),
        "--trainer.callbacks+", "{class_path: src.callbacks.SampleGeneration, init_args: "
        "{num_samples: 2, max_new_tokens: 6, metrics: [exact_match], num_metric_samples: 4}}",
        *extra,
    ]  # fmt: skip


def test_validation_reward_by_a_field_averages_the_rows_of_each_value(micro_model_dir):
    import lightning.pytorch as pl

    from src.errors import ConfigError

    m = module(micro_model_dir, rewards=["tests.grpo_fixed.row_score"], reward_by="task")
    rows = [
        {"prompt": "Add 1 and 2.", "answer": "3", "task": "add", "score": 1.0},
        {"prompt": "Count: a b", "answer": "2", "task": "count", "score": 0.25},
        {"prompt": "Add 2 and 2.", "answer": "4", "task": "add", "score": 0.5},
    ]
    examples = [{"fields": {"task": t}} for t in ("upper", "count", "add", "add")]
    m._reward_groups = m._group_values(examples)  # what setup reads off the validation rows
    assert m._reward_groups == ["add", "count", "upper"] and m._group_values([]) == []
    m._trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    terms = m.eval_terms(prompt_batch(m, rows))
    sums = {k: v.item() for k, v in terms.sums.items() if k.startswith("reward_by/")}
    counts = {k: v.item() for k, v in terms.counts.items() if k.startswith("reward_by/")}
    assert sums == {"reward_by/add": 1.5, "reward_by/count": 0.25, "reward_by/upper": 0.0}
    assert counts == {"reward_by/add": 2, "reward_by/count": 1, "reward_by/upper": 0}
    with pytest.raises(ConfigError, match=r"reward_by: the validation rows have no field "
                       r"'task' \(they have: answer, score\)"):  # fmt: skip
        m._group_values([{"fields": {"answer": "3", "score": "1"}}])


SUMS = [{"prompt": f"Add {a} and {b}.", "answer": str(a + b), "task": "add"} for a, b in
        [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (9, 3), (4, 4), (6, 1)]]  # fmt: skip


@pytest.mark.slow
def test_a_fit_logs_every_metric_and_the_completion_table(tmp_path, micro_model_dir, tokenizer):
    data = write_jsonl(tmp_path / "sums.jsonl", SUMS)
    rewards = ("--model.init_args.rewards", f"[{EXACT}, tests.grpo_fixed.letter_e]")
    cli_main(fit_args(tmp_path, micro_model_dir, data, 2, *rewards))
    run = tmp_path / "runs" / "grpo" / "version_0"
    for tag in ("loss", "reward", "reward_std", "frac_reward_zero_std", "completion_length",
                "clip_ratio/low", "clip_ratio/high", "entropy", "rewards/exact_match",
                "rewards/letter_e", "completions_truncated", "generated_tokens_per_s"):  # fmt: skip
        assert len(scalars(run, f"train/{tag}")) == 2, tag
    for tag in ("reward", "rewards/exact_match", "rewards/letter_e", "completion_length",
                "gen/exact_match"):  # fmt: skip
        assert [s for s, _ in scalars(run, f"val/{tag}")] == [0, 1], tag  # steps 0 and 2
    assert scalars(run, "val/reward_by/add") == scalars(run, "val/reward")  # one task: all rows
    assert not scalars(run, "val/loss")  # evaluation scores completions; there is no loss
    entropy = scalars(run, "train/entropy")[0][1]
    assert 0 < entropy <= math.log(len(tokenizer))  # nats, at most a uniform vocabulary's
    acc = EventAccumulator(str(next(run.glob("events.out.tfevents.*"))))
    acc.Reload()
    (table,) = [e for e in acc.Tensors("completions/text_summary")]
    text = table.tensor_proto.string_val[0].decode()
    assert "| prompt | completion | reward | advantage |" in text
    assert text.count("| Add 1 and 2. |") + text.count("| Add") >= 4
    assert (run / "hf" / "model.safetensors").exists()


@pytest.mark.slow
def test_resume_draws_the_same_completions_and_trains_the_same(tmp_path, micro_model_dir):
    """Three steps at once, or one step and a resume from its checkpoint, with
    num_iterations 2: the resumed run restores the unfinished round's completions and samples
    step 2's as the uninterrupted run did; losses and weights agree."""
    data = write_jsonl(tmp_path / "sums.jsonl", SUMS)
    common = ("--model.init_args.rewards", "[tests.grpo_fixed.letter_e]",
              "--model.init_args.num_iterations", "2", "--trainer.limit_val_batches", "0",
              "--model.init_args.optimizer.init_args.lr", "0.01",
              "--model.init_args.warmup", "0")  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    cli_main(fit_args(whole, micro_model_dir, data, 3, *common))
    cli_main(fit_args(parts, micro_model_dir, data, 1, *common,
                      "--trainer.logger.init_args.version", "0"))  # fmt: skip
    ckpt = parts / "runs" / "grpo" / "version_0" / "checkpoints" / "last.ckpt"
    assert "grpo_rollouts" in torch.load(ckpt, weights_only=False)
    cli_main(fit_args(parts, micro_model_dir, data, 3, *common, "--ckpt_path", str(ckpt),
                      "--trainer.logger.init_args.version", "0"))  # fmt: skip
    a, b = (d / "runs" / "grpo" / "version_0" for d in (whole, parts))
    losses = [v for _, v in scalars(a, "train/loss")]
    assert len(losses) == 3 and any(abs(v) > 1e-6 for v in losses)  # it trained
    assert [v for _, v in scalars(b, "train/loss")][-2:] == pytest.approx(losses[1:], abs=1e-6)
    wa, wb = (load_file(d / "hf" / "model.safetensors") for d in (a, b))
    for name, value in wa.items():
        torch.testing.assert_close(wb[name], value, atol=1e-6, rtol=0, msg=name)
