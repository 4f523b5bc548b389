"""Lightning's DeepSpeed strategy on CPU processes (gloo), for the 2-process tests.

Lightning refuses DeepSpeed without a CUDA accelerator; DeepSpeed itself runs on a CPU (its
CPU accelerator, gloo). This subclass skips Lightning's refusals and nothing else, so the
engine, ZeRO partitioning, checkpoints and the module's DeepSpeed path all run for real.
"""

from __future__ import annotations

import deepspeed.comm.torch
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

# DeepSpeed compiles a shared-memory all-reduce for CPU processes on first use (minutes on 2
# cores); it is an optimisation over gloo's, which the tests use instead
deepspeed.comm.torch.build_shm_op = lambda: None


class CPUDeepSpeed(DeepSpeedStrategy):
    @property
    def root_device(self) -> torch.device:
        # DeepSpeed takes the device index as the process's device rank (None: refused);
        # a CPU tensor moved to "cpu:<n>" is on the CPU as any other
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # the parent's, without its CUDA-only check

    def setup_distributed(self) -> None:
        # the parent's, without its check that device indices (None on a CPU) are ranks
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
