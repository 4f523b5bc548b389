"""Callbacks: sample generation, validation at step 0, Hugging Face export,
predictions to JSON Lines."""

from src.callbacks.checkpoint import RunCheckpoint
from src.callbacks.divergence import DivergenceError, DivergenceGuard
from src.callbacks.generation import SampleGeneration, generate
from src.callbacks.hf_export import HFExport
from src.callbacks.prediction_writer import PredictionWriter
from src.callbacks.preemption import Preemption
from src.callbacks.throughput import Throughput
from src.callbacks.validate_on_start import ValidateOnStart

__all__ = [
    "DivergenceError",
    "DivergenceGuard",
    "HFExport",
    "PredictionWriter",
    "Preemption",
    "RunCheckpoint",
    "SampleGeneration",
    "Throughput",
    "ValidateOnStart",
    "generate",
]
