"""Group-relative policy optimisation (GRPO) with rewards computed by programs."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from src.compat import attached_trainer
from src.datamodules.chat import generation_stop_ids
from src.errors import ConfigError
from src.generation import generate_ids
from src.loggers import log_table
from src.modules.base import CausalLMModule, LossTerms
from src.modules.head import label_map
from src.modules.losses import IGNORE_INDEX, next_token_targets
from src.modules.policy_gradient import SCALES, clipped_policy_loss, group_advantages
from src.modules.reference import Reference
from src.modules.referenced import ReferencedModule
from src.modules.rewards import RewardSet
from src.strategies import parameters_are_sharded

Scale = Literal[SCALES]
DEFAULT_REWARDS = ["src.modules.rewards.ExactMatch"]


@dataclass
class Rollout:
    """One micro-batch's generations: what every update of ``num_iterations`` trains on."""

    prompt_ids: torch.Tensor  # the batch's prompts (to check a repeated batch is the same)
    inputs: dict[str, torch.Tensor]  # prompt + completion rows, right-padded, completion labels
    advantages: torch.Tensor  # one per completion
    old_logps: torch.Tensor | None  # per completion token, before the first update (mu > 1)
    ref_logps: torch.Tensor | None  # per completion token under the reference (beta > 0)
    sums: dict[str, torch.Tensor]  # the reward metrics, measured once per generation
    counts: dict[str, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_cpu(getattr(self, f.name)) for f in fields(self)}


class GRPOModule(ReferencedModule):
    """GRPO (Shao et al., 2024, arXiv:2402.03300) on prompts whose completions a program
    scores (``PromptDataModule``; reward functions in ``rewards.py``).

    Each micro-batch of prompts gets ``num_generations`` completions per prompt, sampled
    with the policy in eval mode and without gradients; the reward functions score them,
    each reward minus its group's mean (over a prompt's completions), scaled by the group's
    standard deviation as ``scale_rewards`` says, is the advantage of every token of the
    completion; the loss is PPO's clipped surrogate (``epsilon``, DAPO's ``epsilon_high``)
    plus ``beta`` times the k3 KL to the reference. The loss of an optimizer step is the
    mean over every completion token of the step, across gradient accumulation and devices
    (DAPO's token mean; the shared accounting of ``CausalLMModule``), so a long completion
    weighs as much per token as a short one.

    With ``num_iterations`` mu > 1 the data serve every optimizer step's prompts mu times in
    a row (``PromptDataModule.repeat_rounds``); the first pass generates and records the
    policy's log-probabilities, the next mu - 1 train on the same completions with
    importance ratios against them. Log-probabilities are of the sampling distribution
    (logits over ``temperature``), as the sampler drew from.

    Sampling is seeded by ``seed``, the optimizer step, the micro-batch and the rank, so a
    resumed run draws the same completions as an uninterrupted one; the completions of an
    unfinished round of ``num_iterations`` are saved in the checkpoint.

    Args:
        rewards: Reward functions: dotted paths (``src.modules.rewards.ExactMatch``, your
            ``my_rewards.brevity``) or ``{class_path, init_args}``. Each is called as
            ``fn(prompts, completions, **fields)`` with lists of strings (the prompts' last
            user messages, the completions) and the rows' other columns as lists.
        reward_weights: One weight per function (default 1 each); the reward is their sum.
        num_generations: Completions per prompt (the group); 2 or more.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass (``null``: the whole vocabulary).
        num_iterations: Updates per generation batch (mu).
        epsilon: Lower clip of the importance ratio, ``1 - epsilon``.
        epsilon_high: Upper clip, ``1 + epsilon_high`` (DAPO; default ``epsilon``).
        beta: Weight of the KL to the reference (0, as DAPO: no reference is kept).
        scale_rewards: ``group`` (divide by the group's std, GRPO), ``batch`` (by the
            micro-batch's), ``none`` (Dr. GRPO: unscaled).
        ref_model_name_or_path: Reference model for ``beta > 0`` (default: a frozen copy of
            the initial policy; adapters off under LoRA).
        log_completions_every_n_steps: A TensorBoard table (``completions``) of the first
            micro-batch's prompts, completions, rewards and advantages this often (0: never).
        num_logged_completions: Rows of that table.
        reward_by: A row field such as ``task``: validation also logs
            ``val/reward_by/<value>``, the greedy reward of the rows with each of its values.
        seed: Seed of the sampling.
        **kwargs: See ``CausalLMModule`` (``max_new_tokens``: the completions' length limit;
            validation completes greedily with it too).
    """

    reference_columns = ()
    loss_divisor = CausalLMModule.loss_divisor  # per-token sums, as SFT

    def __init__(
        self,
        *args: Any,
        rewards: list[str | dict[str, Any]] | None = None,
        reward_weights: list[float] | None = None,
        num_generations: int = 8,
        temperature: float = 1.0,
        top_p: float | None = None,
        num_iterations: int = 1,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        scale_rewards: Scale = "group",
        ref_model_name_or_path: str | None = None,
        log_completions_every_n_steps: int = 50,
        num_logged_completions: int = 8,
        reward_by: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if num_generations < 2:
            raise ConfigError(
                f"num_generations must be at least 2 (a group's advantages are relative to "
                f"its mean), got {num_generations}"
            )
        if num_iterations < 1 or temperature <= 0 or epsilon < 0 or beta < 0:
            raise ConfigError("num_iterations must be >= 1, temperature > 0, epsilon and beta >= 0")
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        if scale_rewards not in SCALES:
            raise ConfigError(f"scale_rewards must be one of {', '.join(SCALES)}")
        try:
            self.rewards = RewardSet(rewards or DEFAULT_REWARDS, reward_weights)
        except ValueError as err:
            raise ConfigError(f"model.init_args.rewards: {err}") from err
        self.reward_keys = [_metric_key(name) for name in self.rewards.names]
        self.num_generations = num_generations
        self.temperature = temperature
        self.top_p = top_p
        self.num_iterations = num_iterations
        self.epsilon = epsilon
        self.epsilon_high = epsilon_high
        self.beta = beta
        self.scale_rewards = scale_rewards
        self.ref_model_name_or_path = ref_model_name_or_path
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.num_logged_completions = num_logged_completions
        self.reward_by = reward_by
        self._reward_groups: list[str] = []  # the values of reward_by, from the validation rows
        self.seed = seed
        self.reference = Reference(ref_model_name_or_path) if beta > 0 else None
        self.stop_ids = generation_stop_ids(self.tokenizer)
        self._rollouts: dict[int, Rollout] = {}  # the round's, by micro-batch
        self._batch_idx = 0
        self._generated = [0, 0.0]  # tokens and seconds of the step's generation

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and hasattr(datamodule, "repeat_rounds"):
            rows = datamodule.batch_size * self.trainer.accumulate_grad_batches
            datamodule.repeat_rounds(self.num_iterations, rows * self.trainer.world_size)
        elif stage == "fit" and self.num_iterations > 1:
            raise ConfigError("num_iterations > 1 needs a PromptDataModule (repeat_rounds)")
        if self.reward_by is not None:
            self._reward_groups = self._group_values(getattr(datamodule, "val_examples", []))

    def _group_values(self, examples: list[dict[str, Any]]) -> list[str]:
        """The values of ``reward_by`` in the validation rows, the same on every rank (each
        metric is a sum reduced over ranks, whether or not a rank's rows have the value)."""
        rows = [e.get("fields", {}) for e in examples]
        values = sorted({str(f[self.reward_by]) for f in rows if f.get(self.reward_by) is not None})
        if rows and not values:  # (without validation rows there is nothing to break down)
            have = sorted({k for f in rows for k in f})
            raise ConfigError(
                f"model.init_args.reward_by: the validation rows have no field "
                f"{self.reward_by!r} (they have: {', '.join(have) or 'no other column'})"
            )
        return values

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    # ------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def loss_terms(self, batch: dict[str, Any]) -> LossTerms:
        rollout = self._rollout_for(batch)
        stats = self.token_stats(rollout.inputs)
        logps = stats[:, 0]
        old = rollout.old_logps if rollout.old_logps is not None else logps.detach()
        loss = clipped_policy_loss(
            logps[:, None],
            old[:, None],
            rollout.advantages[self._token_rows(rollout.inputs)],
            torch.ones_like(logps[:, None]),
            self.epsilon,
            self.epsilon_high,
            None if rollout.ref_logps is None else rollout.ref_logps[:, None],
            self.beta,
        )
        sums = dict(rollout.sums)
        sums |= {
            "clip_ratio/low": loss.clipped_low,
            "clip_ratio/high": loss.clipped_high,
            "entropy": stats[:, 1].sum(),
        }
        if self.beta:
            sums["kl"] = loss.kl_sum
        return LossTerms(loss.loss_sum, loss.tokens, sums, dict(rollout.counts))

    def _rollout_for(self, batch: dict[str, Any]) -> Rollout:
        """This micro-batch's generations: new on the first pass of a round, else the ones
        made for the same prompts on the first pass."""
        trainer = attached_trainer(self)
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        position = self._batch_idx % (accumulate * self.num_iterations)
        micro = position % accumulate
        if position < accumulate:
            self._rollouts[micro] = self.rollout(batch, micro)
        rollout = self._rollouts.get(micro)
        if rollout is None or not torch.equal(
            rollout.prompt_ids.to(batch["prompt_ids"].device), batch["prompt_ids"]
        ):
            raise RuntimeError(
                "the prompts of a repeated batch differ from those its completions were "
                "generated for: num_iterations needs the data in repeated rounds "
                "(PromptDataModule) and an unchanged batch size and accumulation"
            )
        return rollout

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any], micro: int = 0) -> Rollout:
        """Generate, score and measure the completions of a batch of prompts."""
        g = self.num_generations
        prompt_ids = batch["prompt_ids"].repeat_interleave(g, 0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(g, 0)
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        row_fields = [f for f in batch["fields"] for _ in range(g)]
        started = time.perf_counter()
        completion_ids = self.sample_completions(prompt_ids, prompt_mask, row_fields, micro)
        lengths = _completion_lengths(completion_ids, self.stop_ids)
        self._generated[0] += int(lengths.sum())
        self._generated[1] += time.perf_counter() - started
        completions = self._decode(completion_ids, lengths)
        total, per_function = self.rewards(prompts, completions, _columns(row_fields))
        advantages = group_advantages(total, g, self.scale_rewards)
        inputs = _sequences(
            prompt_ids, prompt_mask, completion_ids, lengths, self.tokenizer.pad_token_id
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        old = self.token_stats(inputs)[:, 0] if self.num_iterations > 1 else None
        ref = None
        if self.reference is not None:
            with self.reference.scoring() as model:
                ref = self.token_stats(inputs, model)[:, 0]
        sums, counts = self._reward_metrics(total, per_function, lengths)
        self._log_completions(micro, prompts, completions, total, advantages.advantages)
        return Rollout(
            batch["prompt_ids"],
            inputs,
            advantages.advantages.to(self.device),
            old,
            ref,
            {k: v.to(self.device) for k, v in sums.items()},
            {k: v.to(self.device) for k, v in counts.items()},
        )

    def sample_completions(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        row_fields: list[dict[str, Any]],
        micro: int = 0,
    ) -> torch.Tensor:
        """The sampled completion tokens ``(rows, <= max_new_tokens)`` of left-padded prompts,
        each prompt ``num_generations`` times in a row (``row_fields``: each row's fields); a
        row ends at its first stop token, and what follows it is ignored. A generation
        backend (a vLLM server, say) plugs in here. Seeded by ``seed``, the optimizer step,
        the micro-batch and the rank, apart from the training RNG streams.

        Under FSDP and ZeRO-3 every rank decodes in lockstep until all are done."""
        trainer = attached_trainer(self)
        world, rank, step = (
            (0, 0, 0)
            if trainer is None
            else (trainer.world_size, trainer.global_rank, trainer.global_step)
        )
        synced = trainer is not None and parameters_are_sharded(trainer.strategy) and world > 1
        device = prompt_ids.device
        seed = (((self.seed * 1_000_003 + step) * 1_009 + micro) * 65_537 + rank) % 2**63
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return generate_ids(
                self.model,
                prompt_ids,
                prompt_mask,
                self.max_new_tokens,
                self.tokenizer.pad_token_id,
                self.stop_ids,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                synced_gpus=synced,
            )

    def token_stats(
        self, inputs: dict[str, torch.Tensor], model: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """``(tokens, 2)``: each completion token's log-probability under ``model`` (default:
        the policy) at the sampling temperature, and the entropy (no gradient) of that
        distribution there; chunk by chunk through the lean head."""
        _, targets = next_token_targets(inputs["labels"])
        targets = targets.to(self.device)
        temperature = self.temperature

        def stats(z: torch.Tensor, rows: slice) -> torch.Tensor:
            logprobs = torch.log_softmax(z / temperature, dim=-1)
            logp = logprobs.gather(1, targets[rows, None]).squeeze(1)
            entropy = -(logprobs.exp() * logprobs).sum(-1).detach()
            return torch.stack([logp, entropy], 1)

        model = self.model if model is None else model
        return label_map(model, inputs, stats, 2, self.lm_head, self.lm_head_chunk_size)

    @staticmethod
    def _token_rows(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The row of every completion token, in label order."""
        mask, _ = next_token_targets(inputs["labels"])
        return mask.nonzero()[:, 0]

    def _reward_metrics(
        self,
        total: torch.Tensor,
        per_function: torch.Tensor,
        lengths: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Sums and counts of the reward metrics: per completion, per group, per function."""
        g = self.num_generations
        n = torch.tensor(float(len(total)))
        groups = torch.tensor(float(len(total) // g))
        within = group_advantages(total, g, "none")  # each group's own std, whatever the scale
        sums, counts = self._reward_sums(total, per_function)
        sums |= {
            "reward_std": torch.nan_to_num(within.std[::g]).sum(),
            "frac_reward_zero_std": within.zero_std[::g].float().sum(),
            "completion_length": lengths.float().sum(),
            "completions_truncated": (lengths >= self.max_new_tokens).float().sum(),
        }
        counts |= {
            "reward_std": groups,
            "frac_reward_zero_std": groups,
            "completion_length": n,
            "completions_truncated": n,
        }
        return sums, counts

    def _reward_sums(
        self, total: torch.Tensor, per_function: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The reward and each function's, summed over the rows that have one, and counted."""
        sums, counts = {}, {}
        sums["reward"], counts["reward"] = _scored_sum(total)
        for key, values in zip(self.reward_keys, per_function, strict=True):
            sums[f"rewards/{key}"], counts[f"rewards/{key}"] = _scored_sum(values)
        return sums, counts

    def _decode(self, completion_ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Each completion's text through its stop token, stripped, special tokens left out."""
        rows = [ids[:n] for ids, n in zip(completion_ids.tolist(), lengths.tolist(), strict=True)]
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    def _log_completions(
        self,
        micro: int,
        prompts: list[str],
        completions: list[str],
        total: torch.Tensor,
        advantages: torch.Tensor,
    ) -> None:
        every = self.log_completions_every_n_steps
        trainer = attached_trainer(self)
        if not every or trainer is None or micro or trainer.global_step % every:
            return
        rows = [
            {
                "prompt": p,
                "completion": c,
                "reward": round(float(r), 4),
                "advantage": round(float(a), 4),
            }
            for p, c, r, a in list(zip(prompts, completions, total, advantages, strict=True))[
                : self.num_logged_completions
            ]
        ]
        log_table(trainer, "completions", rows, trainer.global_step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        tokens, seconds = self._generated
        if seconds > 0:  # this rank's, over the step's generations
            self.log("train/generated_tokens_per_s", tokens / seconds, on_step=True, batch_size=1)
        self._generated = [0, 0.0]

    # ----------------------------------------------------------- evaluation
    def eval_terms(self, batch: dict[str, Any]) -> LossTerms:
        """One greedy completion per prompt, scored: ``val/reward``, ``val/rewards/<fn>``,
        ``val/completion_length`` (means over every prompt)."""
        completion_ids = generate_ids(
            self.model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            self.max_new_tokens,
            self.tokenizer.pad_token_id,
            self.stop_ids,
            synced_gpus=parameters_are_sharded(self.trainer.strategy)
            and self.trainer.world_size > 1,
        )
        lengths = _completion_lengths(completion_ids, self.stop_ids)
        total, per_function = self.rewards(
            list(batch["prompts"]),
            self._decode(completion_ids, lengths),
            _columns(batch["fields"]),
        )
        n = torch.tensor(float(len(total)), device=self.device)
        sums, counts = self._reward_sums(total, per_function)
        sums["completion_length"] = lengths.float().sum()
        if self._reward_groups:
            values = [str(f.get(self.reward_by)) for f in batch["fields"]]
            for group in self._reward_groups:  # every one, present in these rows or not
                rows = torch.tensor([v == group for v in values], dtype=torch.bool)
                key = f"reward_by/{_metric_key(group)}"
                sums[key], counts[key] = _scored_sum(total[rows])
        to = self.device
        sums = {k: v.to(to) for k, v in sums.items()}
        counts = {k: v.to(to) for k, v in counts.items()}
        return LossTerms(None, n, sums, counts)

    # ------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.num_iterations > 1 and self._rollouts:
            checkpoint["grpo_rollouts"] = {m: r.to_dict() for m, r in self._rollouts.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("grpo_rollouts") or {}
        self._rollouts = {int(m): Rollout(**r) for m, r in saved.items()}
        for rollout in self._rollouts.values():
            rollout.inputs = {k: v.to(self.device) for k, v in rollout.inputs.items()}
            for name in ("advantages", "old_logps", "ref_logps"):
                value = getattr(rollout, name)
                if value is not None:
                    setattr(rollout, name, value.to(self.device))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.max_length and self.max_new_tokens > self.max_length:
            rank_zero_warn(
                f"max_new_tokens {self.max_new_tokens} exceeds max_length {self.max_length}"
            )


def _completion_lengths(completion_ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """Each completion's length through its first stop token (all of it if none)."""
    width = completion_ids.shape[1]
    stops = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    first = stops.float().argmax(1) + 1  # argmax: the first stop
    return torch.where(stops.any(1), first, torch.full_like(first, width)).cpu()


def _sequences(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    lengths: torch.Tensor,
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """Each prompt (without its left padding) followed by its completion through the stop
    token, right-padded, with the completion tokens as labels: the positions the sampler
    saw, so the policy scores exactly what it drew."""
    rows = []
    for ids, mask, completion, n in zip(
        prompt_ids.tolist(), prompt_mask.tolist(), completion_ids.tolist(), lengths.tolist(),
        strict=True,
    ):  # fmt: skip
        prompt = [t for t, m in zip(ids, mask, strict=True) if m]
        rows.append((prompt, completion[:n]))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        p, n = len(prompt), len(completion)
        input_ids[i, : p + n] = torch.tensor(prompt + completion)
        labels[i, p : p + n] = torch.tensor(completion)
        attention[i, : p + n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _scored_sum(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of the rewards and how many rows have one (NaN: a function had none)."""
    return torch.nansum(rewards), (~torch.isnan(rewards)).float().sum()


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Rows of fields as columns; a field some rows lack is None there."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {name: [row.get(name) for row in rows] for name in names}


def _metric_key(name: str) -> str:
    """A reward function's name as a metric name: ``exact_match(answer)`` -> ``exact_match``
    when its field is the default, else ``exact_match_answer``."""
    key = re.sub(r"\(answer\)$", "", name)
    return re.sub(r"\W+", "_", key).strip("_") or "reward"


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
