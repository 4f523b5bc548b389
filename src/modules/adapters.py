"""LoRA-family adapters through peft: LoRA, DoRA, rsLoRA, QLoRA."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel

from src.errors import ConfigError
from src.local_paths import check_local_path
from src.strategies import missing_requirements


@dataclass
class LoraSettings:
    """Adapters on the model's linear layers (``configs/peft/lora.yaml``).

    Args:
        r: Rank of the update.
        alpha: Scale numerator (the update is scaled by alpha / r, or alpha / sqrt(r)).
        dropout: Dropout on the adapter input.
        target_modules: Module names, or ``all-linear`` (every linear layer but the output).
        use_dora: Weight-decomposed adapters (DoRA).
        use_rslora: Rank-stabilised scaling alpha / sqrt(r) (rsLoRA).
        adapter_path: Continue training an existing adapter directory.
        load_in_4bit: QLoRA: quantise the frozen pretrained base to 4 bits (bitsandbytes,
            CUDA only; not with ``from_scratch``).
        merge: Export also a merged full model (``hf/merged``) next to the adapter.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    adapter_path: str | None = None
    load_in_4bit: bool = False
    merge: bool = False
    modules_to_save: list[str] = field(default_factory=list)


QLORA = "QLoRA (model.init_args.lora.load_in_4bit: true)"
WITHOUT_QLORA = "or train plain LoRA (load_in_4bit: false)"


def qlora_problem() -> str | None:
    """What QLoRA needs and this machine lacks (a CUDA GPU, bitsandbytes), or None."""
    return missing_requirements(QLORA, gpu=True, packages=("bitsandbytes",), instead=WITHOUT_QLORA)


def quantization_kwargs(settings: LoraSettings | None) -> dict:
    """``from_pretrained`` arguments for QLoRA, with a clear error where it cannot run."""
    if settings is None or not settings.load_in_4bit:
        return {}
    problem = qlora_problem()
    if problem:
        raise ConfigError(problem)
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    }


def add_adapters(
    model: PreTrainedModel, settings: LoraSettings, task_type: str = "CAUSAL_LM"
) -> PreTrainedModel:
    """The model with trainable adapters (new, or loaded from ``adapter_path``); peft's
    ``task_type`` ``SEQ_CLS`` keeps a classifier head (``score``) whole and trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if settings.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if settings.adapter_path:
        check_local_path(settings.adapter_path, "adapter")
        model = PeftModel.from_pretrained(model, settings.adapter_path, is_trainable=True)
    else:
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.target_modules,
            use_dora=settings.use_dora,
            use_rslora=settings.use_rslora,
            modules_to_save=settings.modules_to_save or None,
            task_type=task_type,
        )
        model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rank_zero_info(
        f"[model] adapters: {trainable / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters "
        f"({100 * trainable / total:.2f}%)"
    )
    return model
