"""A DDP strategy that claims to accumulate gradients itself, as DeepSpeed does, so that the
modules take their DeepSpeed path (loss scaled before backward) in a CPU test."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class EngineLikeDDP(DDPStrategy):
    @property
    def handles_gradient_accumulation(self) -> bool:
        return True
