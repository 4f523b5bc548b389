"""Callbacks: sample generation, validation at step 0, Hugging Face export."""

from src.callbacks.generation import SampleGeneration, generate
from src.callbacks.hf_export import HFExport
from src.callbacks.validate_on_start import ValidateOnStart

__all__ = ["HFExport", "SampleGeneration", "ValidateOnStart", "generate"]
