"""The arithmetic of group-relative policy optimisation (GRPO, Shao et al., 2024), on tensors.

Rewards of ``num_generations`` completions per prompt become advantages relative to their
group; the clipped importance-weighted policy gradient (PPO's surrogate, with DAPO's separate
upper bound) and an optional KL to a reference give one loss per completion token. The loss
is returned as a per-token tensor and a sum over the completion tokens: the caller divides
the sum by the completion tokens of the whole optimizer step (DAPO's token mean), which the
shared loss accounting does across accumulation and devices.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantages 0, not 0/0


class Advantages(NamedTuple):
    advantages: torch.Tensor  # (groups * num_generations,)
    std: torch.Tensor  # the standard deviation each was scaled by (before STD_EPS)
    zero_std: torch.Tensor  # bool per completion: its group's rewards were all equal


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: str = "group"
) -> Advantages:
    """Each reward minus its group's mean, divided by the group's standard deviation
    (``scale="group"``, GRPO), the whole batch's (``"batch"``), or not at all (``"none"``,
    Dr. GRPO's unscaled variant). Rows are grouped as ``rewards.view(-1, num_generations)``:
    a prompt's completions next to each other. Standard deviations are unbiased (Bessel), as
    TRL's; a NaN reward (a function that does not score a row) is left out of its group's
    statistics and gets advantage 0."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    if scale == "batch":
        std = _nanstd(rewards.reshape(-1)).expand_as(rewards.reshape(-1))
    else:  # "none" keeps the group's for the zero-variance count
        std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards.reshape(-1) - mean
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(advantages, nan=0.0), std, zero_std)


def _nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased standard deviation ignoring NaNs; NaN where fewer than two values."""
    keep = dim is not None
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    squares = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=keep)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=keep)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(squares, torch.nan))
    return torch.sqrt(squares * correction)


class PolicyLoss(NamedTuple):
    per_token: torch.Tensor  # (rows, completion tokens), 0 outside the mask
    loss_sum: torch.Tensor  # the sum over the masked tokens
    tokens: torch.Tensor  # how many tokens were summed
    clipped_low: torch.Tensor  # masked tokens whose ratio was clipped below (negative advantage)
    clipped_high: torch.Tensor  # ... above (positive advantage)
    kl_sum: torch.Tensor  # the sum of the per-token KL estimate (0 without a reference)


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> PolicyLoss:
    """The clipped surrogate per completion token, ``-min(r A, clip(r, 1-eps, 1+eps_high) A)``
    with ``r = exp(logps - old_logps)``, plus ``beta`` times the k3 estimate of the KL to the
    reference, ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's unbiased, non-negative one,
    as GRPO's paper and TRL use).

    ``logps``, ``old_logps`` and ``ref_logps`` are the log-probabilities of the sampled tokens,
    ``(rows, tokens)``; ``advantages`` one per row; ``mask`` 1 on completion tokens. With
    ``old_logps = logps.detach()`` (one update per generation batch) the ratio is 1 and the
    gradient is the plain policy gradient.
    """
    high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    advantages = advantages.reshape(-1, 1).to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl_sum = logps.new_zeros(())
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        kl_sum = (kl * mask).sum().detach()
    per_token = per_token * mask
    with torch.no_grad():
        low_clip = ((ratio < 1 - epsilon) & (advantages < 0)).to(mask.dtype) * mask
        high_clip = ((ratio > 1 + high) & (advantages > 0)).to(mask.dtype) * mask
    return PolicyLoss(
        per_token, per_token.sum(), mask.sum(), low_clip.sum(), high_clip.sum(), kl_sum
    )
