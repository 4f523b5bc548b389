"""Export of the trained model and tokenizer to ``<run>/hf`` for plain transformers."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from src.callbacks.run_dir import run_dir
from src.modules.adapters import add_adapters
from src.strategies import full_state_dict


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
        directory = run_dir(trainer)
        state = full_state_dict(trainer, pl_module)  # under FSDP/ZeRO-3 every rank takes part
        if not trainer.is_global_zero or directory is None:
            return
        export(pl_module, Path(directory) / self.dirname, state)


def export(pl_module: pl.LightningModule, out: Path, state: dict | None = None) -> None:
    """``save_pretrained`` of the module's model (or of ``state``, its full weights gathered
    from shards) and tokenizer; with ``lora.merge`` also ``merged/``."""
    model = pl_module.model
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    pl_module.tokenizer.save_pretrained(out)
    rank_zero_info(f"[export] model and tokenizer written to {out}")
    lora = getattr(pl_module, "lora", None)
    if lora is not None and lora.merge:
        if state is not None:  # sharded weights: rebuild a whole copy on the CPU to merge
            model = pl_module.load_model(pl_module.model_name_or_path, pl_module.from_scratch)
            model = add_adapters(model, lora)
            model.load_state_dict(state)
        merged = copy.deepcopy(model).merge_and_unload()  # the trained model stays as is
        merged.save_pretrained(out / "merged", safe_serialization=True)
        pl_module.tokenizer.save_pretrained(out / "merged")
        rank_zero_info(f"[export] merged model written to {out / 'merged'}")
