"""Callbacks, each importable as ``src.callbacks.<Name>`` (the class path configs use):
sample generation, validation at step 0, Hugging Face export, predictions to JSON Lines,
checkpoints (periodic, best, early stopping), throughput and MFU, the divergence guard,
the learning rate, preemption, progress bars that count steps, the run record,
lm-evaluation-harness benchmarks in the loop, and the diagnosis of the curves."""

from src.callbacks.checkpoint import BestCheckpoint, EarlyStop, RunCheckpoint
from src.callbacks.diagnosis import Diagnosis
from src.callbacks.divergence import DivergenceError, DivergenceGuard
from src.callbacks.generation import SampleGeneration
from src.callbacks.hf_export import HFExport
from src.callbacks.learning_rate import LearningRate
from src.callbacks.lm_eval import LMEval
from src.callbacks.prediction_writer import PredictionWriter
from src.callbacks.preemption import Preemption
from src.callbacks.progress import StepRichProgressBar, StepTQDMProgressBar
from src.callbacks.run_record import RunRecord
from src.callbacks.throughput import Throughput
from src.callbacks.validate_on_start import ValidateOnStart

__all__ = [
    "BestCheckpoint",
    "Diagnosis",
    "DivergenceError",
    "DivergenceGuard",
    "EarlyStop",
    "HFExport",
    "LMEval",
    "LearningRate",
    "PredictionWriter",
    "Preemption",
    "RunCheckpoint",
    "RunRecord",
    "SampleGeneration",
    "StepRichProgressBar",
    "StepTQDMProgressBar",
    "Throughput",
    "ValidateOnStart",
]
