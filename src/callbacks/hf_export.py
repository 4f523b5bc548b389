"""Export of the trained model and tokenizer to ``<run>/hf`` for plain transformers."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from src.callbacks.run_dir import run_dir


class HFExport(pl.Callback):
    """Write ``save_pretrained`` output (safetensors) at the end of fit.

    With LoRA adapters, ``hf/`` holds the adapter (load it with peft), and with
    ``lora.merge`` also ``hf/merged``: the full model with the adapters folded in.

    Args:
        dirname: Folder name inside the run directory.
    """

    def __init__(self, dirname: str = "hf") -> None:
        self.dirname = dirname

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or run_dir(trainer) is None:
            return
        out = Path(run_dir(trainer)) / self.dirname
        model = pl_module.model
        model.save_pretrained(out, safe_serialization=True)
        pl_module.tokenizer.save_pretrained(out)
        rank_zero_info(f"[export] model and tokenizer written to {out}")
        lora = getattr(pl_module, "lora", None)
        if lora is not None and lora.merge:
            merged = copy.deepcopy(model).merge_and_unload()  # the trained model stays as is
            merged.save_pretrained(out / "merged", safe_serialization=True)
            pl_module.tokenizer.save_pretrained(out / "merged")
            rank_zero_info(f"[export] merged model written to {out / 'merged'}")
