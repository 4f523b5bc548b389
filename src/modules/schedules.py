"""Learning-rate schedules with warmup, as multipliers of the optimizer's learning rate.

They are stepped once per optimizer step (``interval: "step"``), never per micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

ScheduleName = Literal["cosine", "linear", "constant"]


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` below 1 is a fraction of ``total_steps``; from 1 up it is a step count."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


def lr_multiplier(
    name: ScheduleName, total_steps: int, warmup: int, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """Linear warmup to 1 over ``warmup`` steps, then ``name`` down to ``min_lr_ratio``."""
    if name not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {name!r}: expected cosine, linear or constant")

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return multiplier
