"""LightningModules: the shared ``CausalLMModule`` and one small subclass per objective."""

from src.modules.base import CausalLMModule, LossTerms
from src.modules.sft import SFTModule

__all__ = ["CausalLMModule", "LossTerms", "SFTModule"]
