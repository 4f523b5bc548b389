"""The token loss equals a hand computation; schedules have the documented shape."""

from __future__ import annotations

import math

import pytest
import torch

from src.modules.losses import token_cross_entropy
from src.modules.schedules import lr_multiplier, warmup_steps


def test_token_cross_entropy_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 4, 2]])
    loss_sum, count, correct = token_cross_entropy(logits, labels)
    expected, hits = 0.0, 0
    for b in range(2):
        for t in range(3):  # logits[t] predicts labels[t + 1]
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            row = logits[b, t]
            expected += -(row[target] - torch.logsumexp(row, dim=0)).item()
            hits += int(row.argmax().item() == target)
    assert count.item() == 4
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert correct.item() == hits


def test_cosine_schedule_with_warmup():
    assert warmup_steps(0.1, 100) == 10 and warmup_steps(5, 100) == 5
    f = lr_multiplier("cosine", total_steps=100, warmup=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)
    assert f(1000) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    linear = lr_multiplier("linear", total_steps=10, warmup=0)
    assert [round(linear(s), 2) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_multiplier("constant", total_steps=10, warmup=2)(7) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier("step", 10, 0)  # type: ignore[arg-type]
