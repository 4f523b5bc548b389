"""Export any checkpoint of a run as a Hugging Face model directory.

    python scripts/export.py runs/sft/version_0/checkpoints/step=500.ckpt
    python scripts/export.py runs/sft/version_0/checkpoints/last.ckpt --out my-model --merge

Reads single-file checkpoints, sharded FSDP1/FSDP2 checkpoint directories (one shard per
rank, consolidated here on the CPU) and DeepSpeed checkpoint directories (through deepspeed's
``zero_to_fp32``). The model is rebuilt from the run's ``config.yaml`` (found beside
``checkpoints/``, or given with ``--config``), the weights are loaded, and ``save_pretrained``
writes them with the tokenizer and chat template; with LoRA, the adapter (and with ``--merge``
also ``merged/``, the full model with the adapters folded in).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.callbacks.hf_export import export  # noqa: E402
from src.checkpoint_io import read_checkpoint  # noqa: E402
from src.cli import LINKED_DATA_ARGS  # noqa: E402
from src.compat import load_distributed_checkpoint  # noqa: E402
from src.modules.base import CausalLMModule  # noqa: E402
from src.strategies import model_key  # noqa: E402


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The LightningModule state dict of a checkpoint file or sharded checkpoint directory."""
    if path.is_file():
        return read_checkpoint(path)["state_dict"]
    if not path.is_dir():
        raise SystemExit(f"export: no checkpoint at {path}")
    if (path / ".metadata").exists():  # torch.distributed.checkpoint: FSDP1, FSDP2
        state = load_distributed_checkpoint(path)
        return state["model"] if "model" in state else state["state_dict"]
    if (path / "checkpoint").is_dir() or (path / "latest").exists():  # DeepSpeed
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path))
    raise SystemExit(f"export: {path} is neither a checkpoint file nor a sharded checkpoint")


def build_module(config_path: Path, merge: bool) -> CausalLMModule:
    """The run's LightningModule, as its config describes it, with its model built."""
    from jsonargparse import ArgumentParser

    config = yaml.safe_load(config_path.read_text())
    model = dict(config["model"])
    init_args: dict[str, Any] = dict(model.get("init_args", {}))
    data_args = config.get("data", {}).get("init_args", {})
    for name in LINKED_DATA_ARGS:
        if name in data_args and name not in init_args:
            init_args[name] = data_args[name]
    if merge:
        if not init_args.get("lora"):
            raise SystemExit("export: --merge needs a run trained with LoRA adapters")
        init_args["lora"] = {**init_args["lora"], "merge": True}
    parser = ArgumentParser()
    parser.add_subclass_arguments(CausalLMModule, "model")
    parsed = parser.parse_object({"model": {**model, "init_args": init_args}})
    module = parser.instantiate_classes(parsed).model
    module.configure_model()
    return module


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file or a sharded directory")
    parser.add_argument("--config", type=Path, help="the run's config.yaml (default: found)")
    parser.add_argument("--out", type=Path, help="output directory (default: <run>/hf-<name>)")
    parser.add_argument("--merge", action="store_true", help="also write the merged model")
    args = parser.parse_args(argv)

    run = args.checkpoint.resolve().parent.parent
    config = args.config or run / "config.yaml"
    if not config.exists():
        raise SystemExit(f"export: no config at {config}; pass --config")
    out = args.out or run / f"hf-{args.checkpoint.name.removesuffix('.ckpt')}"
    module = build_module(config, args.merge)
    weights = {model_key(k): v for k, v in load_weights(args.checkpoint).items()}
    missing, unexpected = module.model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SystemExit(
            f"export: the checkpoint does not fit the model of {config}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    export(module, out)
    return out


if __name__ == "__main__":
    main()
