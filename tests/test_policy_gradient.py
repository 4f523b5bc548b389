"""GRPO's arithmetic (``src.modules.policy_gradient``): advantages and the clipped loss by
hand, and against TRL's ``GRPOTrainer`` on the same log-probabilities."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from src.modules.policy_gradient import clipped_policy_loss, group_advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # 2 prompts x 4
    out = group_advantages(rewards, num_generations=4)
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased: mean 0.5, four deviations of 0.5
    expected = [(r - 0.5) / (std + 1e-4) for r in (1, 0, 0, 1)] + [0.0] * 4
    torch.testing.assert_close(out.advantages, torch.tensor(expected), rtol=0, atol=1e-6)
    assert out.zero_std.tolist() == [False] * 4 + [True] * 4  # the second group teaches nothing
    unscaled = group_advantages(rewards, 4, scale="none").advantages  # Dr. GRPO
    torch.testing.assert_close(unscaled, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    batch = group_advantages(rewards, 4, scale="batch").advantages
    torch.testing.assert_close(batch, (rewards - torch.tensor([0.5] * 4 + [2.0] * 4))
                               / (rewards.std() + 1e-4))  # fmt: skip


def test_a_reward_left_out_is_out_of_its_group_and_gets_no_advantage():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    out = group_advantages(rewards, 4, scale="none")
    torch.testing.assert_close(out.advantages, torch.tensor([0.0, 0.0, -1.0, 1.0]))


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.zeros(4), 2, scale="rows")


def inputs(seed=0, rows=4, tokens=5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(rows, tokens, generator=g) * 3
    old = logps + 0.3 * torch.randn(rows, tokens, generator=g)  # a few ratios past the clip
    ref = logps + 0.2 * torch.randn(rows, tokens, generator=g)
    mask = torch.ones(rows, tokens)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2])
    return logps.requires_grad_(), old, ref, mask, advantages


def test_the_clipped_loss_by_hand():
    logps, old, ref, mask, adv = inputs()
    out = clipped_policy_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.28,
                              ref_logps=ref, beta=0.04)  # fmt: skip
    total, tokens, low, high = 0.0, 0, 0, 0
    for i in range(4):
        for t in range(5):
            if not mask[i, t]:
                continue
            r = math.exp(logps[i, t].item() - old[i, t].item())
            a = adv[i].item()
            clipped = min(max(r, 0.8), 1.28)
            d = ref[i, t].item() - logps[i, t].item()
            total += -min(r * a, clipped * a) + 0.04 * (math.exp(d) - d - 1)
            tokens += 1
            low += r < 0.8 and a < 0
            high += r > 1.28 and a > 0
    assert out.loss_sum.item() == pytest.approx(total, abs=1e-5)
    assert (out.tokens.item(), out.clipped_low.item(), out.clipped_high.item()) == (
        tokens,
        low,
        high,
    )
    assert low + high > 0  # the inputs reach past both bounds
    assert out.per_token[mask == 0].abs().sum() == 0


def test_one_update_per_generation_is_the_plain_policy_gradient():
    # old = logps.detach(): ratio 1, gradient -A per token (of the log-prob)
    logps, _, _, mask, adv = inputs()
    out = clipped_policy_loss(logps, logps.detach(), adv, mask)
    out.loss_sum.backward()
    torch.testing.assert_close(logps.grad, -adv.view(-1, 1) * mask)
    assert out.loss_sum.item() == pytest.approx(-(adv.view(-1, 1) * mask).sum().item())


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    gather_for_metrics = gather


def trl_loss(loss_type, logps, old, ref, mask, adv, epsilon, epsilon_high, beta):
    """``GRPOTrainer._compute_loss`` of the installed TRL, its model call replaced by the given
    log-probabilities (one process, no accumulation, one step per generation)."""
    pytest.importorskip("trl", reason="TRL is not installed (the dev extra has it)")
    from trl.trainer.grpo_trainer import GRPOTrainer

    rows, tokens = logps.shape
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon_high, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(), _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), max_completion_length=tokens,
    )  # fmt: skip
    batch = {
        "prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.zeros(rows, tokens, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(fake, None, batch), fake._metrics["train"]


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_the_token_mean_equals_trls_loss(loss_type, beta):
    """DAPO's token mean over the step (one micro-batch: also BNPO's) is our loss sum over the
    completion tokens; the clip fractions and the KL equal TRL's metrics."""
    logps, old, ref, mask, adv = inputs(seed=2)
    ours = clipped_policy_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.28,
                               ref_logps=ref, beta=beta)  # fmt: skip
    theirs, metrics = trl_loss(loss_type, logps, old, ref, mask, adv, 0.2, 0.28, beta)
    torch.testing.assert_close(ours.loss_sum / ours.tokens, theirs, rtol=0, atol=1e-6)
    tokens = ours.tokens.item()
    assert ours.clipped_low.item() > 0 and ours.clipped_high.item() > 0  # both bounds bite
    assert metrics["clip_ratio/low_mean"][0] == pytest.approx(ours.clipped_low.item() / tokens)
    assert metrics["clip_ratio/high_mean"][0] == pytest.approx(ours.clipped_high.item() / tokens)
    if beta:
        assert metrics["kl"][0] == pytest.approx(ours.kl_sum.item() / tokens, abs=1e-6)
    grads = torch.autograd.grad(ours.loss_sum / ours.tokens, logps, retain_graph=True)[0]
    expected = torch.autograd.grad(theirs, logps)[0]
    torch.testing.assert_close(grads, expected, rtol=0, atol=1e-6)
