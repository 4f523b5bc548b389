"""FSDP whose unit of sharding and of activation checkpointing is the model's decoder layer.

The layer class is found from the model itself (transformers' ``_no_split_modules``), so one
preset serves Llama, Qwen, Mistral, Gemma... without naming a class in the config.

Also what a setting needs of the machine (a CUDA GPU, an optional package), said before a
run starts rather than as a library's traceback once it has.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import PreTrainedModel

from src.compat import (
    activation_checkpointing_policy,
    attached_trainer,
    no_split_modules,
    redirect_forward,
    set_wrap_classes,
    without_wrapper_prefixes,
    zero3_full_state_dict,
)

# optional packages: import name -> (distribution, how to install it)
OPTIONAL_PACKAGES = {
    "deepspeed": ("deepspeed", "pip install -e '.[deepspeed]'"),
    "bitsandbytes": ("bitsandbytes", "pip install -e '.[qlora]'"),
    "liger_kernel": ("liger-kernel", "pip install liger-kernel"),
}


def cuda_absence(mps_counts: bool = False) -> str | None:
    """Why no CUDA GPU is visible to torch, or None when one is (or, with ``mps_counts``,
    when an Apple GPU is: Lightning's ``accelerator: gpu`` takes either)."""
    if torch.cuda.is_available():
        return None
    if mps_counts and torch.backends.mps.is_available():
        return None
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    return "torch finds no CUDA device or driver"


def missing_requirements(
    what: str, gpu: bool = False, packages: tuple[str, ...] = (), instead: str = ""
) -> str | None:
    """A one-line message naming what ``what`` needs and this machine lacks, or None.

    Args:
        what: The setting, as the user wrote it, e.g. ``QLoRA (model.init_args.lora...)``.
        gpu: Whether it needs a CUDA GPU.
        packages: Import names of the optional packages it needs (``OPTIONAL_PACKAGES``).
        instead: What to do without them, appended after the needs.
    """
    needs = []
    reason = cuda_absence() if gpu else None
    if reason:
        needs.append(f"a CUDA GPU, and none is visible ({reason})")
    for module in packages:
        if importlib.util.find_spec(module) is None:
            name, install = OPTIONAL_PACKAGES[module]
            needs.append(f"the {name} package, which is not installed: {install}")
    if not needs:
        return None
    return f"{what} needs {'; and '.join(needs)}" + (f"; {instead}" if instead else "")


def decoder_layer_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The classes of the transformer blocks in ``model`` (adapters and wrappers included)."""
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            names.update(no_split_modules(module))
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            f"cannot find the decoder layer class of {type(model).__name__} (its "
            "_no_split_modules is empty): pass auto_wrap_policy to the strategy yourself"
        )
    return classes


class DecoderLayerPolicy(ModuleWrapPolicy):
    """Wrap each decoder layer; the classes are filled in from the model once it exists."""

    def __init__(self) -> None:
        super().__init__(set())

    def fill(self, model: torch.nn.Module) -> None:
        set_wrap_classes(self, decoder_layer_classes(model))


class LayerFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` that wraps (and optionally checkpoints) each decoder layer.

    Args:
        checkpoint_layers: Recompute each decoder layer's activations in backward.
        **kwargs: See Lightning's ``FSDPStrategy`` (``sharding_strategy``: ``FULL_SHARD``,
            ``HYBRID_SHARD`` to shard within a node and replicate across nodes, ...;
            ``state_dict_type``: ``sharded`` writes one shard per rank). An explicit
            ``auto_wrap_policy`` replaces the decoder-layer one.
    """

    def __init__(self, *args: Any, checkpoint_layers: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("auto_wrap_policy", DecoderLayerPolicy())
        if checkpoint_layers:
            kwargs.setdefault("activation_checkpointing_policy", DecoderLayerPolicy())
        super().__init__(*args, **kwargs)
        self.checkpoint_layers = checkpoint_layers

    # a private hook of FSDPStrategy: checked by src.compat.PRIVATE_HOOKS
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        policies = [self.kwargs.get("auto_wrap_policy"), activation_checkpointing_policy(self)]
        for policy in policies:
            if isinstance(policy, DecoderLayerPolicy):
                policy.fill(model)
        if self.root_device.type == "cpu" and not _wrapped(model):
            # Lightning passes device_id=root_device.index, None on a CPU, where FSDP needs
            # the device itself; wrapped here, Lightning only adds activation checkpointing
            from torch.distributed.fsdp import FullyShardedDataParallel

            model = FullyShardedDataParallel(
                module=model,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied
        return super()._setup_model(model)


def _wrapped(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def shard_like_policy(strategy: FSDPStrategy, module: torch.nn.Module) -> torch.nn.Module:
    """Another model (the DPO reference) sharded like the trained one, for inference."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(
        module,
        auto_wrap_policy=ModuleWrapPolicy(decoder_layer_classes(module)),
        cpu_offload=None if on_cpu(strategy) else strategy.cpu_offload,
        sharding_strategy=strategy.sharding_strategy,
        mixed_precision=strategy.mixed_precision_config,
        device_id=strategy.root_device if on_cpu(strategy) else strategy.root_device.index,
        use_orig_params=True,
    )


def on_cpu(strategy: Strategy) -> bool:
    return strategy.root_device.type == "cpu"


def is_fsdp(strategy: Strategy) -> bool:
    return isinstance(strategy, FSDPStrategy)


def engine_owns_gradients(strategy: Strategy) -> bool:
    """Whether the strategy's engine accumulates and keeps the gradients itself (DeepSpeed),
    out of reach of ``param.grad``."""
    return bool(getattr(strategy, "handles_gradient_accumulation", False))


def zero_stage(strategy: Strategy) -> int:
    """The DeepSpeed ZeRO stage of ``strategy`` (0 when it is not DeepSpeed)."""
    config = getattr(strategy, "config", None)
    if not engine_owns_gradients(strategy) or not config:
        return 0
    return int(config.get("zero_optimization", {}).get("stage", 0))


def parameters_are_sharded(strategy: Strategy) -> bool:
    """Whether no rank holds the full weights (FSDP, ZeRO-3): model calls are collectives."""
    return is_fsdp(strategy) or zero_stage(strategy) == 3


def call_outside_step(module: pl.LightningModule, method: str, *args: Any) -> Any:
    """``module.<method>(*args)`` run outside a training step, where it calls the model.

    Under FSDP the call goes through the root wrapper's forward, so the parameters it holds
    (embeddings, final norm, ...) are gathered as in a step; elsewhere it is a plain call.
    """
    trainer = attached_trainer(module)
    strategy = trainer.strategy if trainer is not None else None
    if strategy is not None and is_fsdp(strategy) and strategy.model is not module:
        return redirect_forward(strategy, module, method, *args)
    return getattr(module, method)(*args)


def full_state_dict(trainer: pl.Trainer, module: pl.LightningModule) -> dict | None:
    """The full weights of ``module.model`` on global rank 0, gathered from the shards.

    A collective under FSDP and ZeRO-3 (every rank must call it); ``None`` where the model
    on each rank is already whole (its own ``state_dict`` is the full one).
    """
    strategy = trainer.strategy
    if is_fsdp(strategy):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(
            strategy.model,
            # offloading the gathered weights to a CPU they are on crashes torch 2.13's FSDP1
            options=StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu(strategy)),
        )
    elif zero_stage(strategy) == 3:
        state = zero3_full_state_dict(strategy.deepspeed_engine)
    else:
        return None
    return strip_prefixes(state) if trainer.is_global_zero else {}


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """A LightningModule-level state dict with the keys the Hugging Face model uses."""
    return {model_key(key): value for key, value in state.items()}


def model_key(name: str) -> str:
    """A parameter's name inside the Hugging Face model, without strategy wrappers."""
    name = without_wrapper_prefixes(name).removeprefix("module.")
    return name.removeprefix("model.")  # the LightningModule's attribute
