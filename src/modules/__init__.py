"""LightningModules: the shared ``CausalLMModule`` and one small subclass per objective."""

from src.modules.adapters import LoraSettings
from src.modules.base import CausalLMModule, LossTerms
from src.modules.distill import DistillationModule
from src.modules.dpo import DPOModule
from src.modules.grpo import GRPOModule
from src.modules.kto import KTOModule
from src.modules.pretrain import PretrainModule
from src.modules.reward import RewardModule
from src.modules.sft import SFTModule

__all__ = [
    "CausalLMModule",
    "DPOModule",
    "DistillationModule",
    "GRPOModule",
    "KTOModule",
    "LoraSettings",
    "LossTerms",
    "PretrainModule",
    "RewardModule",
    "SFTModule",
]
