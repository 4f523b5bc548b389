"""Export of the trained model and tokenizer to ``<run>/hf`` for plain transformers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from src.callbacks.checkpoint import BestCheckpoint
from src.callbacks.run_dir import run_dir
from src.checkpoint_io import read_checkpoint, saves_single_file
from src.datamodules.chat import clear_padding
from src.errors import one_line
from src.model_card import push_to_hub, write_model_card
from src.modules.adapters import add_adapters
from src.strategies import full_state_dict, model_key, parameters_are_sharded


class HFExport(pl.Callback):
    """Write ``save_pretrained`` output (safetensors) at the end of fit.

    With LoRA adapters, ``hf/`` holds the adapter (load it with peft), and with
    ``lora.merge`` also ``hf/merged``: the full model with the adapters folded in.

    Args:
        dirname: Folder name inside the run directory.
        checkpoint: ``last``: the weights the fit ended with. ``best``: the best checkpoint
            ranked by ``val/loss`` (``--best.save_top_k`` 1 or more; ``--best.export true``
            asks for the same from the command line), loaded into the module before the
            export, so the module holds those weights after fit. Under sharded strategies
            (FSDP, DeepSpeed) ``hf/`` keeps the final weights, with a warning naming the best
            checkpoint for ``scripts/export.py``.
        model_card: Write ``README.md`` (``src.model_card``): base model, objective, data
            and fingerprints, steps and tokens, final metrics, the command to reproduce.
        license: The card's license (default: the base model's card's, when it is local).
        push_to_hub: A Hub repository (``user/name``) to upload ``hf/`` to once written
            (needs a network and ``huggingface-cli login`` or ``HF_TOKEN``).
        hub_private: Create that repository private.
    """

    def __init__(
        self,
        dirname: str = "hf",
        checkpoint: Literal["last", "best"] = "last",
        model_card: bool = True,
        license: str | None = None,
        push_to_hub: str | None = None,
        hub_private: bool = True,
    ) -> None:
        self.dirname = dirname
        self.checkpoint = checkpoint
        self.model_card = model_card
        self.license = license
        self.push_to_hub = push_to_hub
        self.hub_private = hub_private

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.wants_best(trainer) and ranked_checkpoint(trainer) is None:
            raise ValueError(
                "exporting the best checkpoint needs checkpoints ranked by val/loss: "
                "add --best.save_top_k 1 (or a ModelCheckpoint with a monitor)"
            )

    def wants_best(self, trainer: pl.Trainer) -> bool:
        """``checkpoint: best`` here, or ``export`` on the run's ``BestCheckpoint``."""
        return self.checkpoint == "best" or any(
            isinstance(c, BestCheckpoint) and c.export for c in trainer.checkpoint_callbacks
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = run_dir(trainer)
        if self.wants_best(trainer):
            load_best(trainer, pl_module)
        state = full_state_dict(trainer, pl_module)  # under FSDP/ZeRO-3 every rank takes part
        if not trainer.is_global_zero or directory is None:
            return
        out = Path(directory) / self.dirname
        export(pl_module, out, state)
        if self.model_card:
            self.write_card(trainer, out, Path(directory))
        if self.push_to_hub:
            try:
                url = push_to_hub(out, self.push_to_hub, private=self.hub_private)
            except Exception as err:  # noqa: BLE001 - the run and its export are kept
                rank_zero_warn(
                    f"[export] upload to {self.push_to_hub} failed ({one_line(err)}); retry "
                    f"with: huggingface-cli upload {self.push_to_hub} {out}"
                )
            else:
                rank_zero_info(f"[export] {out} uploaded to {self.push_to_hub}: {url}")

    def write_card(self, trainer: pl.Trainer, out: Path, directory: Path) -> None:
        """``README.md`` in ``out`` (and in ``out/merged``), from the final logged metrics."""
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if torch.is_tensor(v) and v.numel() == 1
        }
        for folder in (out, out / "merged"):
            if folder.is_dir():
                write_model_card(folder, directory, metrics, trainer.global_step, self.license)
        rank_zero_info(f"[export] model card written to {out / 'README.md'}")


def export(pl_module: pl.LightningModule, out: Path, state: dict | None = None) -> None:
    """``save_pretrained`` of the module's model (or of ``state``, its full weights gathered
    from shards) and tokenizer; with ``lora.merge`` also ``merged/``."""
    model = pl_module.model
    saved = without_tied_copies(model, state) if state is not None else None
    model.save_pretrained(out, state_dict=saved, safe_serialization=True)
    clear_padding(pl_module.tokenizer).save_pretrained(out)  # as loaded: a clean input
    rank_zero_info(f"[export] model and tokenizer written to {out}")
    lora = getattr(pl_module, "lora", None)
    if lora is not None and lora.merge:
        if state is not None:  # sharded weights: rebuild a whole copy on the CPU to merge
            model = pl_module.load_model(pl_module.model_name_or_path, pl_module.from_scratch)
            model = add_adapters(model, lora, pl_module.adapter_task)
            model.load_state_dict(state)
        merged = copy.deepcopy(model).merge_and_unload()  # the trained model stays as is
        merged.save_pretrained(out / "merged", safe_serialization=True)
        clear_padding(pl_module.tokenizer).save_pretrained(out / "merged")
        rank_zero_info(f"[export] merged model written to {out / 'merged'}")


def without_tied_copies(model: torch.nn.Module, state: dict) -> dict:
    """Full weights gathered from shards hold a tied tensor (embeddings and LM head) once per
    name, as separate copies that ``save_pretrained`` cannot see are tied: keep the first name
    only, as a model saved unsharded does."""
    first: dict[int, str] = {}
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        key = model_key(name)
        if first.setdefault(id(param), key) != key:
            copies.add(key)
    return {k: v for k, v in state.items() if k not in copies}


def ranked_checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The run's checkpoint callback that keeps the best by a metric (``BestCheckpoint``
    first, else any ``ModelCheckpoint`` with a ``monitor``), or None."""
    ranked = [c for c in trainer.checkpoint_callbacks if c.monitor and c.save_top_k != 0]
    ranked.sort(key=lambda c: not isinstance(c, BestCheckpoint))
    return ranked[0] if ranked else None


def load_best(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    """Load the best checkpoint's model weights into ``pl_module.model`` (on every rank).

    Returns the checkpoint's path; None, with a warning, where the final weights stay: no best
    checkpoint was saved, or the strategy shards them (load them with ``scripts/export.py``).
    """
    callback = ranked_checkpoint(trainer)
    path = callback.best_model_path if callback is not None else ""
    if not path:
        rank_zero_warn("[export] no best checkpoint was saved: exporting the final weights")
        return None
    strategy = trainer.strategy
    if parameters_are_sharded(strategy) or not saves_single_file(strategy):
        rank_zero_warn(
            f"[export] the best checkpoint is not loaded under {type(strategy).__name__}: hf/ "
            f"holds the final weights; export the best with: python scripts/export.py {path}"
        )
        return None
    if not get_filesystem(path).exists(path):  # a rank on another node without the run's
        return None  # filesystem (only global rank 0 exports)
    checkpoint = read_checkpoint(path)
    weights = {
        model_key(k): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    pl_module.model.load_state_dict(weights, strict=True)
    score = callback.best_model_score
    rank_zero_info(
        f"[export] best checkpoint loaded: {path}"
        + (f" ({callback.monitor} = {score.item():.4f})" if score is not None else "")
    )
    return path
