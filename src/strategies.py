"""FSDP (FSDP2 and FSDP1) whose unit of sharding and of activation checkpointing is the
model's decoder layer.

The layer class is found from the model itself (transformers' ``_no_split_modules``), so one
preset serves Llama, Qwen, Mistral, Gemma... without naming a class in the config.

Also what a setting needs of the machine (a CUDA GPU, an optional package), said before a
run starts rather than as a library's traceback once it has.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import PreTrainedModel

from src.compat import (
    activation_checkpointing_policy,
    attached_strategy,
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
    "wandb": ("wandb", "pip install -e '.[loggers]'"),
    "mlflow": ("mlflow", "pip install -e '.[loggers]'"),
    "swanlab": ("swanlab", "pip install -e '.[loggers]'"),
    "lm_eval": ("lm-eval", "pip install -e '.[eval]'"),
    "matplotlib": ("matplotlib", "pip install -e '.[plots]'"),
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


DTypeName = Literal["float32", "bfloat16", "float16"]


class LayerFSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``, parameters as DTensors) of each decoder layer, then the root.

    Lightning's ``ModelParallelStrategy`` sets up the device mesh and the sharded (DCP)
    checkpoints, which load on any number of processes; the module calls ``shard`` on its
    model in ``configure_model``. Frozen and trainable parameters (LoRA) may share a unit.

    Args:
        param_dtype: Dtype the gathered parameters compute in (``bfloat16``: mixed precision
            with float32 parameters and optimizer state in the shards); None: their own.
        reduce_dtype: Dtype gradients are reduced over processes in (None: ``param_dtype``).
        cpu_offload: Keep the parameter shards, gradients and optimizer step on the CPU.
        checkpoint_layers: Recompute each decoder layer's activations in backward.
        reshard_after_forward: Free the gathered parameters after each unit's forward (they
            are gathered again in backward); False keeps them, trading memory for traffic.
        save_distributed_checkpoint: One shard per process in a directory (DCP); False
            gathers one full checkpoint file on rank 0.
        **kwargs: See Lightning's ``ModelParallelStrategy`` (``process_group_backend``,
            ``timeout``). Every process is one data-parallel shard (tensor parallelism needs
            a per-model plan, which is not offered here).
    """

    def __init__(
        self,
        param_dtype: DTypeName | None = None,
        reduce_dtype: DTypeName | None = "float32",
        cpu_offload: bool = False,
        checkpoint_layers: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.cpu_offload = cpu_offload
        self.checkpoint_layers = checkpoint_layers
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Lightning's "auto" data-parallel size is the node count (the rest tensor parallel);
        # here every process is a data-parallel shard
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, model: torch.nn.Module, trainable: bool = True) -> torch.nn.Module:
        """``fully_shard`` each decoder layer of ``model``, then the model itself (in place).

        ``trainable`` False (a frozen DPO reference): no activation checkpointing.
        """
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        def dtype(name: str | None) -> torch.dtype | None:
            return getattr(torch, name) if name else None

        options: dict[str, Any] = {
            "mesh": self.device_mesh["data_parallel"],
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=dtype(self.param_dtype), reduce_dtype=dtype(self.reduce_dtype)
            ),
            # pinned memory (for fast copies to a GPU) needs a GPU
            "offload_policy": (
                CPUOffloadPolicy(pin_memory=not on_cpu(self))
                if self.cpu_offload
                else OffloadPolicy()
            ),
        }
        if self.checkpoint_layers and trainable and hasattr(model, "gradient_checkpointing_enable"):
            # transformers checkpoints each decoder layer's call: the layer is also the FSDP
            # unit, so its parameters are gathered again in the recompute
            model.gradient_checkpointing_enable({"use_reentrant": False})
        classes = tuple(decoder_layer_classes(model))
        layers = [m for m in model.modules() if isinstance(m, classes)]
        for layer in layers:
            fully_shard(layer, **options)
        fully_shard(model, **options)
        rank_zero_info(
            f"[fsdp2] {len(layers) + 1} units ({classes[0].__name__} and the root) sharded "
            f"over {self.world_size} processes"
            + (f", computing in {self.param_dtype}" if self.param_dtype else "")
            + (", offloaded to the CPU" if self.cpu_offload else "")
        )
        return model


class LayerFSDPStrategy(FSDPStrategy):
    """FSDP1 (kept for one release: FSDP2, ``LayerFSDP2Strategy``, is the recommended path).

    ``FSDPStrategy`` that wraps (and optionally checkpoints) each decoder layer.

    Args:
        checkpoint_layers: Recompute each decoder layer's activations in backward.
        **kwargs: See Lightning's ``FSDPStrategy`` (``sharding_strategy``: ``FULL_SHARD``,
            ``HYBRID_SHARD`` to shard within a node and replicate across nodes, ...;
            ``state_dict_type``: ``sharded`` writes one shard per rank). An explicit
            ``auto_wrap_policy`` replaces the decoder-layer one.
    """

    def __init__(self, *args: Any, checkpoint_layers: bool = False, **kwargs: Any) -> None:
        # `is None`, not setdefault: the CLI passes every argument it knows, None included
        if kwargs.get("auto_wrap_policy") is None:
            kwargs["auto_wrap_policy"] = DecoderLayerPolicy()
        if checkpoint_layers and kwargs.get("activation_checkpointing_policy") is None:
            kwargs["activation_checkpointing_policy"] = DecoderLayerPolicy()
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
        model = super()._setup_model(model)
        _report_units("fsdp", model, self.world_size)
        return model


def _units(model: torch.nn.Module) -> int:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return sum(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _wrapped(model: torch.nn.Module) -> bool:
    return _units(model) > 0


def _report_units(name: str, model: torch.nn.Module, world_size: int) -> None:
    rank_zero_info(f"[{name}] {_units(model)} units sharded over {world_size} processes")


def shard_like_policy(strategy: FSDPStrategy, module: torch.nn.Module) -> torch.nn.Module:
    """Another model (the DPO reference) sharded like the trained one, for inference."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    sharded = FullyShardedDataParallel(
        module,
        auto_wrap_policy=ModuleWrapPolicy(decoder_layer_classes(module)),
        cpu_offload=None if on_cpu(strategy) else strategy.cpu_offload,
        sharding_strategy=strategy.sharding_strategy,
        mixed_precision=strategy.mixed_precision_config,
        device_id=strategy.root_device if on_cpu(strategy) else strategy.root_device.index,
        use_orig_params=True,
    )
    _report_units("fsdp", sharded, strategy.world_size)
    return sharded


def on_cpu(strategy: Strategy) -> bool:
    return strategy.root_device.type == "cpu"


def is_fsdp(strategy: Strategy) -> bool:
    """FSDP1: flat parameters, one local shard each, behind wrapper modules."""
    return isinstance(strategy, FSDPStrategy)


def is_fsdp2(strategy: Strategy) -> bool:
    """FSDP2: each parameter a DTensor, gathered by hooks on the sharded modules' forward."""
    return isinstance(strategy, ModelParallelStrategy)


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


def local_part(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The part of a (possibly sharded) parameter or gradient this rank holds, and whether
    it is a shard: an FSDP2 DTensor's local tensor, a ZeRO-3 partition, else the tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.to_local(), True
    if hasattr(tensor, "ds_tensor"):
        return tensor.ds_tensor, True
    return tensor, False


def parameters_are_sharded(strategy: Strategy) -> bool:
    """Whether no rank holds the full weights (FSDP, ZeRO-3): model calls are collectives."""
    return is_fsdp(strategy) or is_fsdp2(strategy) or zero_stage(strategy) == 3


def call_outside_step(module: pl.LightningModule, method: str, *args: Any) -> Any:
    """``module.<method>(*args)`` run outside a training step, where it calls the model.

    Under FSDP1 the call goes through the root wrapper's forward, so the parameters it holds
    (embeddings, final norm, ...) are gathered as in a step; elsewhere (FSDP2 gathers in
    hooks on the sharded modules themselves) it is a plain call.
    """
    strategy = attached_strategy(module)
    if strategy is not None and is_fsdp(strategy) and strategy.model is not module:
        return redirect_forward(strategy, module, method, *args)
    return getattr(module, method)(*args)


def full_state_dict(trainer: pl.Trainer, module: pl.LightningModule) -> dict | None:
    """The full weights of ``module.model`` on global rank 0, gathered from the shards.

    A collective under FSDP and ZeRO-3 (every rank must call it); ``None`` where the model
    on each rank is already whole (its own ``state_dict`` is the full one).
    """
    strategy = trainer.strategy
    if is_fsdp(strategy) or is_fsdp2(strategy):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # each tensor is gathered and (off a CPU) moved to rank 0's CPU memory in turn, so
        # the device never holds more than one whole tensor beyond its shards; offloading to
        # the CPU the weights are already on crashes torch 2.13's FSDP1
        state = get_model_state_dict(
            strategy.model,
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
