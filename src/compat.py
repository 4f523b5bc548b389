"""Every touch of another library's private names, one named function each.

An upgrade that renames one of them breaks a function here and its test in
``tests/test_compat.py``, not code spread over the template. Overrides of private methods
cannot live here: ``PRIVATE_HOOKS`` lists them (and the inherited private members the
subclasses call), and ``require_private_hooks`` checks they still exist as expected.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    import lightning.pytorch as pl
    import torch
    from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.strategies import Strategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.utils.tensorboard import SummaryWriter

# ----------------------------------------------------------------------------- Lightning


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """A LightningModule's trainer, or None when detached (Lightning's ``_trainer``; the
    public ``trainer`` property raises instead)."""
    return module._trainer


def attached_strategy(module: pl.LightningModule) -> Strategy | None:
    """The strategy of a LightningModule's trainer, or None when detached."""
    trainer = attached_trainer(module)
    return trainer.strategy if trainer is not None else None


def training_loader_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved states of a checkpoint's training dataloaders (Lightning's fit loop state
    ``combined_loader``: one dict per loader, its sampler's under ``_sampler_iter_state``)."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    return [s for s in loop.get("combined_loader", []) if isinstance(s, dict)]


def redirect_forward(
    strategy: Strategy, module: pl.LightningModule, method: str, *args: Any
) -> Any:
    """``module.<method>(*args)`` run through the wrapper's forward, so its hooks (FSDP's
    gathers) run as in a step (Lightning's ``Strategy._forward_redirection``)."""
    return strategy._forward_redirection(strategy.model, module, method, *args)


def cluster_environment(trainer: pl.Trainer) -> ClusterEnvironment | None:
    """The trainer's cluster environment (SLURM, torchelastic...) whatever the strategy, as
    Lightning's signal handling reads it (``Trainer._accelerator_connector``)."""
    return getattr(trainer._accelerator_connector, "cluster_environment", None)


def skip_hparams_autolog(obj: pl.LightningModule | pl.LightningDataModule) -> None:
    """Keep Lightning from logging ``obj``'s hyperparameters at fit start (its
    ``_log_hyperparams`` flag, set by ``save_hyperparameters``)."""
    obj._log_hyperparams = False


def logged_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs ``self.log`` metrics at during fit (batches that stepped the
    optimizer: ``fit_loop.epoch_loop._batches_that_stepped``)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def prefetched_batches(trainer: pl.Trainer | None) -> int:
    """Batches the training loop has fetched but not yet trained on: one ahead for loaders
    without a length, else none (``fit_loop._data_fetcher.batches``)."""
    fetcher = getattr(getattr(trainer, "fit_loop", None), "_data_fetcher", None)
    return len(getattr(fetcher, "batches", ()))


def replace_wrapped_checkpoint_io(wrapper: CheckpointIO, io: CheckpointIO) -> None:
    """Make a wrapping IO (``AsyncCheckpointIO``) save through ``io``, even where a base IO is
    set already, which the public setter keeps (``_WrappingCheckpointIO._checkpoint_io``)."""
    wrapper._checkpoint_io = io


def fsdp_saves_full_state(strategy: Strategy) -> bool:
    """Whether an ``FSDPStrategy`` saves one full checkpoint file rather than a sharded
    directory (its ``_state_dict_type``)."""
    return getattr(strategy, "_state_dict_type", None) == "full"


def saves_distributed_checkpoint(strategy: Strategy) -> bool:
    """Whether a ``ModelParallelStrategy`` saves a sharded directory rather than one file
    (its ``_save_distributed_checkpoint``)."""
    return getattr(strategy, "_save_distributed_checkpoint", True) is not False


def activation_checkpointing_policy(strategy: Strategy) -> Any:
    """The wrap policy an ``FSDPStrategy`` checkpoints activations with, or None (its
    ``_activation_checkpointing_kwargs``)."""
    return strategy._activation_checkpointing_kwargs.get("auto_wrap_policy")


def lightning_has_rich() -> bool:
    """Whether Lightning can use its rich progress bar (``rich`` in a version it accepts:
    ``lightning.pytorch.utilities.imports._RICH_AVAILABLE``)."""
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    return bool(_RICH_AVAILABLE)


def subcommand_parsers(cli: LightningCLI) -> dict[str, LightningArgumentParser]:
    """A LightningCLI's parser of each subcommand, empty when built without subcommands
    (its ``_subcommand_parsers``)."""
    return getattr(cli, "_subcommand_parsers", {})


def parser_of(cli: LightningCLI, subcommand: str | None) -> LightningArgumentParser:
    """The parser of a LightningCLI's ``subcommand``, or its only one for None (its
    ``_parser``)."""
    return cli._parser(subcommand)


def load_distributed_checkpoint(path: Path) -> dict[str, Any]:
    """A whole ``torch.distributed.checkpoint`` directory read into CPU memory, without a
    process group (``lightning.fabric.utilities.load._load_distributed_checkpoint``)."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(Path(path))


# ----------------------------------------------------------------------- argparse (jsonargparse)


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option of a (jsonargparse) parser, nested ones included, with its ``dest``
    (argparse's ``_actions``)."""
    return list(parser._actions)


# --------------------------------------------------------------------------- transformers


def no_split_modules(model: Any) -> list[str]:
    """The class names of a Hugging Face model's blocks that must stay whole on one device,
    its decoder layers (transformers' ``_no_split_modules``)."""
    return list(getattr(model, "_no_split_modules", None) or [])


def compile_chat_template(template: str) -> Any | None:
    """A chat template compiled in transformers' sandbox with its helpers (``raise_exception``,
    ``tojson``...), or None where it has none (``_compile_jinja_template``)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    return _compile_jinja_template(template)


def alias_reasoning_fields(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with reasoning under another name copied to ``reasoning_content``, as
    ``apply_chat_template`` does where it does (``_alias_reasoning_fields``)."""
    try:
        from transformers.utils.chat_template_utils import _alias_reasoning_fields
    except ImportError:  # older transformers: no renaming
        return messages
    return _alias_reasoning_fields(messages)


# --------------------------------------------------------------------------------- torch

# Prefixes that wrappers put in parameter names: Lightning's module wrapper, FSDP,
# activation checkpointing and torch.compile (its ``OptimizedModule``).
WRAPPER_PREFIXES = (
    "_forward_module.",
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
    "_orig_mod.",
)


def without_wrapper_prefixes(name: str) -> str:
    """A parameter's name as in the unwrapped module (without the private attribute names
    of ``WRAPPER_PREFIXES``)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def set_wrap_classes(policy: ModuleWrapPolicy, classes: Iterable[type[torch.nn.Module]]) -> None:
    """Point a ``ModuleWrapPolicy`` built empty at the module classes known later (its
    ``_module_classes`` and ``_module_classes_str``)."""
    policy._module_classes = set(classes)
    policy._module_classes_str = str(policy._module_classes)


def write_summary(writer: SummaryWriter, summary: Any) -> None:
    """Write a raw TensorBoard ``Summary`` protobuf to a ``SummaryWriter``'s event file (its
    ``_get_file_writer``)."""
    writer._get_file_writer().add_summary(summary)


# ------------------------------------------------------------------------- optional packages


def zero3_full_state_dict(engine: Any) -> dict[str, Any]:
    """A DeepSpeed ZeRO-3 engine's full 16-bit weights gathered on rank 0 (a collective; its
    ``_zero3_consolidated_16bit_state_dict``)."""
    return engine._zero3_consolidated_16bit_state_dict()


def apply_liger_kernels(model: Any) -> None:
    """Swap a loaded Hugging Face model's layers for Liger's kernels, whatever its model type
    (``liger_kernel.transformers._apply_liger_kernel_to_instance``)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)


# ------------------------------------------------------------- private hooks of subclasses


@dataclass(frozen=True)
class PrivateHook:
    """A private member of a library class that a subclass here overrides or calls.

    Attributes:
        owner: The library class, dotted (``lightning.pytorch.callbacks.ModelCheckpoint``).
        name: The member (``_save_topk_checkpoint``).
        params: Its parameters after ``self``; None for an instance attribute (checked on
            ``owner()``).
        used_by: Where, for the message of a failed check.
    """

    owner: str
    name: str
    params: tuple[str, ...] | None
    used_by: str

    @property
    def id(self) -> str:
        return f"{self.owner.rpartition('.')[2]}.{self.name}"


_CALLBACKS = "lightning.pytorch.callbacks"
PRIVATE_HOOKS = (
    PrivateHook(
        "lightning.pytorch.strategies.ModelParallelStrategy",
        "_data_parallel_size",
        None,
        "src.strategies.LayerFSDP2Strategy.setup_environment sets it",
    ),
    PrivateHook(
        "lightning.pytorch.strategies.FSDPStrategy",
        "_setup_model",
        ("model",),
        "src.strategies.LayerFSDPStrategy overrides it",
    ),
    PrivateHook(
        f"{_CALLBACKS}.RichProgressBar",
        "_get_train_description",
        ("current_epoch",),
        "src.callbacks.progress.StepRichProgressBar overrides and calls it",
    ),
    PrivateHook(
        f"{_CALLBACKS}.ModelCheckpoint",
        "_save_topk_checkpoint",
        ("trainer", "monitor_candidates"),
        "src.callbacks.checkpoint.RunCheckpoint overrides it",
    ),
    PrivateHook(
        f"{_CALLBACKS}.ModelCheckpoint",
        "_save_last_checkpoint",
        ("trainer", "monitor_candidates"),
        "src.callbacks.checkpoint.RunCheckpoint calls it",
    ),
    PrivateHook(
        f"{_CALLBACKS}.ModelCheckpoint",
        "_save_checkpoint",
        ("trainer", "filepath"),
        "src.callbacks.checkpoint.RunCheckpoint.save_last_now calls it",
    ),
    PrivateHook(
        f"{_CALLBACKS}.ModelCheckpoint",
        "_monitor_candidates",
        ("trainer",),
        "src.callbacks.checkpoint.RunCheckpoint calls it",
    ),
    PrivateHook(
        f"{_CALLBACKS}.ModelCheckpoint",
        "_last_global_step_saved",
        None,
        "src.callbacks.checkpoint.RunCheckpoint.on_train_end reads and sets it",
    ),
    PrivateHook(
        f"{_CALLBACKS}.EarlyStopping",
        "_run_early_stopping_check",
        ("trainer",),
        "src.callbacks.checkpoint.EarlyStop overrides it",
    ),
    PrivateHook(
        "lightning.pytorch.cli.LightningCLI",
        "_instantiate_trainer",
        ("config", "callbacks"),
        "src.cli.LLMCLI overrides it",
    ),
)


def check_private_hook(hook: PrivateHook) -> None:
    """Raise ``RuntimeError`` unless ``hook.owner`` still has ``hook.name`` with the expected
    parameters: an override of a renamed private method would silently never run."""
    module, _, name = hook.owner.rpartition(".")
    owner = getattr(importlib.import_module(module), name)
    where = f"{hook.owner}.{hook.name} (which {hook.used_by})"
    if hook.params is None:
        if not hasattr(owner(), hook.name):
            raise RuntimeError(f"{where} is gone: update src/compat.py and its users")
        return
    member = getattr(owner, hook.name, None)
    if not callable(member):
        raise RuntimeError(f"{where} is gone: update src/compat.py and its users")
    params = tuple(inspect.signature(member).parameters)[1:]
    if params != hook.params:
        raise RuntimeError(f"{where} now takes {params}, not {hook.params}: update the override")


def require_private_hooks() -> None:
    """Check every entry of ``PRIVATE_HOOKS`` (``check_private_hook``)."""
    for hook in PRIVATE_HOOKS:
        check_private_hook(hook)
