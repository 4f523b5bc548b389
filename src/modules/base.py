"""``CausalLMModule``: what every objective shares.

Model creation (in ``configure_model``, so sharded strategies can shard it), the optimizer
with weight-decay groups, the per-step schedule, and exact loss accounting: an objective
returns a *sum* over its units (label tokens, preference pairs) and their count, and the
gradients of an optimizer step are rescaled so that the step's loss is the mean over every
unit of the step, across gradient-accumulation micro-batches and devices.

Reading one optimizer step of ``A`` micro-batches on ``W`` devices:

1. ``loss_terms(batch)`` (the objective) returns ``S``, the loss summed over the batch's
   units, and ``n``, their count (label tokens, or pairs).
2. ``training_step`` adds ``S``, ``n`` and the metric sums to the step's sums and returns
   ``S / D`` (``D = loss_divisor``, a constant that keeps fp16 in range). Lightning divides
   what it returns by ``A`` before backward, and DDP/FSDP average gradients over the ``W``
   devices, so after ``A`` micro-batches each gradient is ``sum of grad(S) / (A * W * D)``.
3. ``on_before_optimizer_step`` sums ``n`` over micro-batches and devices into ``N`` and
   multiplies every gradient by ``A * W * D / N``: the gradient of ``sum(S) / N``, the mean
   loss over every unit of the step, however the units fell across micro-batches and
   devices. It logs that mean, the gradient norm (before Lightning clips, which follows),
   and the other means.
4. The optimizer steps, and the learning-rate schedule of ``configure_optimizers`` steps
   with it (``interval: step``).

Under DeepSpeed the engine keeps the gradients: each micro-batch is a whole step
(``accumulate_grad_batches`` 1) and ``training_step`` returns ``S * W / N`` with ``N`` reduced
over devices before backward; the engine's average over devices leaves ``sum(S) / N``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from src.checkpoint_io import move_data_position
from src.compat import apply_liger_kernels, attached_strategy, attached_trainer
from src.datamodules.tokenizer import TokenizerKey, load_tokenizer
from src.errors import ConfigError, PathNotFoundError, hub_not_found
from src.generation import generate
from src.local_paths import check_local_path
from src.modules import varlen_attention
from src.modules.adapters import LoraSettings, add_adapters, quantization_kwargs
from src.modules.head import DEFAULT_CHUNK_SIZE, HeadPath, label_logps, logits_of
from src.modules.losses import LabelLogps
from src.modules.schedules import ScheduleName, lr_multiplier, warmup_steps
from src.strategies import (
    engine_owns_gradients,
    is_fsdp,
    is_fsdp2,
    local_part,
    missing_requirements,
    model_key,
    parameters_are_sharded,
    zero_stage,
)

DType = Literal["auto", "float32", "bfloat16", "float16"]


COUNT_SUFFIX = "#count"  # a metric's own count among the accumulated sums


@dataclass
class LossTerms:
    """A micro-batch's summed loss over ``count`` units, and further sums to average alike.

    A metric of ``sums`` is averaged over ``count`` unless ``counts`` gives it its own (KTO's
    desirable rows for ``rewards/chosen``); either way over the whole step or evaluation.
    """

    loss_sum: torch.Tensor | None  # None: no loss (an evaluation that only measures)
    count: torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


class CausalLMModule(pl.LightningModule):
    """A causal language model and its training plumbing; subclasses define ``loss_terms``.

    Args:
        model_name_or_path: Hub id or local directory of the model (or of its config alone).
        from_scratch: Initialise weights randomly from the config instead of loading them.
        tokenizer: Tokenizer for generation and export (linked from ``data.tokenizer``).
        chat_template: Chat template override (linked from ``data.chat_template``), so
            generation and the export use the template the data were rendered with.
        max_length: Longest row in tokens (linked from ``data.max_length``).
        torch_dtype: Weight dtype; ``auto`` keeps the checkpoint's. Use a ``*-true``
            trainer precision or mixed precision to match.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``, ``flex_attention``,
            or ``sdpa_varlen`` (sdpa within each packed sequence: packed rows on a CPU).
        gradient_checkpointing: Recompute activations in backward to save memory.
        trust_remote_code: Allow model code shipped with a hub checkpoint to run.
        optimizer: Optimizer class and arguments (``class_path`` + ``init_args``); biases
            and norm weights are put in a group without weight decay.
        scheduler: Learning-rate shape after warmup: ``cosine``, ``linear`` or ``constant``.
        warmup: Warmup length: a fraction of all optimizer steps below 1, else a step count.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        max_new_tokens: Length limit of ``predict`` completions.
        lora: Train LoRA-family adapters instead of every weight (``configs/peft/lora.yaml``).
        compile: ``torch.compile`` the model (dynamic shapes; best with packed rows).
        liger_kernels: Patch in Liger's fused kernels (RMSNorm, RoPE, SwiGLU) when the
            ``liger-kernel`` package is installed; a clear error otherwise.
        lm_head: ``lean``: the objectives get the label tokens' log-probabilities from the
            head chunk by chunk, never the full logits (``head.py``); ``full``: from the
            logits of every position (the reference path, for comparison).
        lm_head_chunk_size: Label tokens per chunk of the lean head (one chunk of
            ``chunk x vocab`` float32 logits exists at a time).
    """

    log_perplexity = False
    auto_model: Any = AutoModelForCausalLM  # what load_model builds
    adapter_task = "CAUSAL_LM"  # peft's task type for LoRA
    uses_lm_head = True  # whether the objective reads the LM head (``lm_head`` applies)

    def __init__(
        self,
        model_name_or_path: str,
        from_scratch: bool = False,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        max_length: int | None = None,
        torch_dtype: DType = "float32",
        attn_implementation: str | None = "sdpa",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: ScheduleName = "cosine",
        warmup: float = 0.0,
        min_lr_ratio: float = 0.0,
        max_new_tokens: int = 256,
        lora: LoraSettings | None = None,
        compile: bool = False,
        liger_kernels: bool = False,
        lm_head: HeadPath = "lean",
        lm_head_chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if lm_head_chunk_size < 1:
            raise ConfigError(f"lm_head_chunk_size must be at least 1, got {lm_head_chunk_size}")
        if from_scratch and lora is not None and lora.load_in_4bit:
            # from_config has no quantised weights to load: the 4-bit flag would be dropped
            raise ConfigError(
                "QLoRA quantises pretrained weights: lora.load_in_4bit needs from_scratch: false"
            )
        self.save_hyperparameters(ignore=["optimizer"])
        self.model_name_or_path = model_name_or_path
        self.from_scratch = from_scratch
        self.tokenizer_name_or_path = tokenizer or model_name_or_path
        self.max_length = max_length
        self.torch_dtype = torch_dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.trust_remote_code = trust_remote_code
        self.optimizer_factory = optimizer
        self.scheduler = scheduler
        self.warmup = warmup
        self.min_lr_ratio = min_lr_ratio
        self.max_new_tokens = max_new_tokens
        self.lora = lora
        self.compile = compile
        self.liger_kernels = liger_kernels
        self.lm_head = lm_head
        self.lm_head_chunk_size = lm_head_chunk_size
        self.model: PreTrainedModel | None = None
        self.tokenizer_key = TokenizerKey(
            self.tokenizer_name_or_path, trust_remote_code, chat_template
        )
        key = "data.init_args.tokenizer" if tokenizer else "model.init_args.model_name_or_path"
        with named_if_missing(self.tokenizer_name_or_path, "tokenizer", key):
            self.tokenizer = load_tokenizer(*self.tokenizer_key)
        self._step_sums: dict[str, torch.Tensor] = {}
        self._scale_loss = False
        self._tokens_seen = 0  # real (non-pad) tokens trained on, over all devices
        self._no_decay: set[str] = set()
        self._eval_sums: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.build_model().train()  # from_pretrained returns eval mode: no dropout
        # decided before any wrapping: FSDP flattens parameters to 1-D
        self._no_decay = {
            name
            for name, p in self.model.named_parameters()
            if len(full_shape(p)) < 2 or "bias" in name or "norm" in name.lower()
        }
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        rank_zero_info(f"[model] {type(self.model).__name__}: {n_params / 1e6:.2f}M parameters")
        self.on_model_built()
        strategy = attached_strategy(self)
        if strategy is not None and is_fsdp2(strategy):
            strategy.shard(self.model)

    def on_model_built(self) -> None:
        """Build what needs the model's initial, unsharded weights (a frozen reference copy);
        FSDP2 shards the model right after this hook."""

    def build_model(self) -> PreTrainedModel:
        """The trained model: the base, with adapters when ``lora`` is set."""
        model = self.load_model(self.model_name_or_path, self.from_scratch, self.lora)
        if self.liger_kernels:
            _apply_liger(model)
        if self.lora is not None:
            model = add_adapters(model, self.lora, self.adapter_task)
        if self.compile:
            model.compile(dynamic=True)  # in place: names and state dict keys unchanged
        return model

    def load_model(
        self,
        name_or_path: str,
        from_scratch: bool = False,
        lora: LoraSettings | None = None,
        dtype: torch.dtype | None = None,
    ) -> PreTrainedModel:
        """A Hugging Face causal LM: from a checkpoint, or initialised from its config; in
        ``dtype`` (default: ``torch_dtype``), read in that dtype rather than cast after."""
        check_local_path(name_or_path, "model")
        strategy = attached_strategy(self)
        if strategy is not None and zero_stage(strategy) == 3:
            # transformers partitions the weights as it loads them only when it is told
            # ZeRO-3 is on; the object must stay alive (transformers keeps a weak reference)
            from transformers.integrations import HfDeepSpeedConfig

            self.__dict__["_hf_deepspeed_config"] = HfDeepSpeedConfig(strategy.config)
        if dtype is None:
            dtype = "auto" if self.torch_dtype == "auto" else getattr(torch, self.torch_dtype)
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": self.trust_remote_code}
        if self.attn_implementation == varlen_attention.NAME:
            varlen_attention.register()
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        keys: dict[str, str] = {}  # which setting named it, for a message
        for attr in ("model_name_or_path", "ref_model_name_or_path", "teacher_name_or_path"):
            if getattr(self, attr, None):
                keys.setdefault(getattr(self, attr), f"model.init_args.{attr}")
        if from_scratch:
            with named_if_missing(name_or_path, "model", keys.get(name_or_path)):
                config = AutoConfig.from_pretrained(
                    name_or_path, trust_remote_code=self.trust_remote_code
                )
            for key, value in self.config_overrides().items():
                setattr(config, key, value)
            if dtype == "auto":
                kwargs["dtype"] = torch.float32
            model = self.auto_model.from_config(config, **kwargs)
        else:
            kwargs |= quantization_kwargs(lora) | self.config_overrides()
            with named_if_missing(name_or_path, "model", keys.get(name_or_path)):
                model = self.auto_model.from_pretrained(name_or_path, **kwargs)
        if len(self.tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(self.tokenizer))
        limit = getattr(model.config, "max_position_embeddings", None)
        if self.max_length and limit and self.max_length > limit:
            rank_zero_warn(f"max_length {self.max_length} exceeds the model's {limit} positions")
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        return model

    def config_overrides(self) -> dict[str, Any]:
        """Model config settings the objective needs (a reward model's single output)."""
        return {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a batch; ``use_cache=False`` so packed rows get a block-diagonal mask."""
        return logits_of(self.model, batch)

    def label_logps(
        self,
        batch: dict[str, torch.Tensor],
        smoothing: bool = False,
        model: torch.nn.Module | None = None,
    ) -> LabelLogps:
        """The label tokens' log-probabilities under ``model`` (default: the policy), by the
        head path of ``lm_head``; ``smoothing`` adds the means over the vocabulary."""
        model = self.model if model is None else model
        return label_logps(model, batch, self.lm_head, self.lm_head_chunk_size, smoothing)

    # ------------------------------------------------------------- objective
    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        """The objective: summed loss of a micro-batch, its unit count, and metric sums."""
        raise NotImplementedError

    def loss_weights(
        self, batch: dict[str, torch.Tensor], key: str = "loss_weights"
    ) -> torch.Tensor | None:
        """The batch's loss weights in training; None in evaluation, whose metrics are plain
        means, so that runs with different weights compare on the same validation loss."""
        return batch.get(key) if self.training else None

    @property
    def loss_divisor(self) -> float:
        """A constant that keeps backpropagated sums near mean size (fp16 has little range)."""
        return float(self.max_length or 1024)

    def on_fit_start(self) -> None:
        # DeepSpeed keeps gradients in its own partitions, out of reach of the rescaling in
        # on_before_optimizer_step: there each micro-batch is a whole step, and its loss is
        # divided by the unit count over all devices before backward instead.
        self._scale_loss = engine_owns_gradients(self.trainer.strategy)
        if self._scale_loss and self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"under {type(self.trainer.strategy).__name__} the exact per-step loss mean "
                "needs accumulate_grad_batches 1: raise data.batch_size (or the device count) "
                "instead, or use ddp or fsdp"
            )
        if self.attn_implementation == "flex_attention" and self.device.type == "cpu":
            raise ValueError(
                "attn_implementation flex_attention needs a CUDA GPU (its CPU kernels do not "
                "compile); on a CPU use sdpa, which gives packed rows the same masks"
            )
        self._step_sums = {}  # nothing left over from an interrupted fit
        if self.uses_lm_head:
            how = f"label tokens only, {self.lm_head_chunk_size} per chunk"
            how = how if self.lm_head == "lean" else "logits of every position"
            rank_zero_info(f"[head] {self.lm_head}: {how}")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        for key in ("real_tokens", "token_slots"):  # the collator's counts: padding efficiency
            if key in batch:
                terms.sums[key] = batch[key]
        _accumulate(self._step_sums, terms)
        if self._scale_loss:  # engines average gradients over devices: undo, then divide
            # a copy: the reduce is in place, and the step sums must keep this rank's count
            count = terms.count.detach().float().clone()
            total = self.trainer.strategy.reduce(count, reduce_op="sum")
            total = torch.where(total > 0, total, torch.ones_like(total))
            return terms.loss_sum * self.trainer.world_size / total
        return terms.loss_sum / self.loss_divisor

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated gradient of summed losses into that of the step's mean loss.

        Each micro-batch backpropagates its summed loss over ``loss_divisor``; Lightning
        divides it by ``accumulate_grad_batches`` and DDP/FSDP average over devices. Undoing
        all three and dividing by the step's unit count over all devices gives the exact
        mean, however the units fall across micro-batches.
        """
        totals = self._reduce(self._step_sums)
        self._step_sums = {}
        if not totals:
            return
        count = totals.pop("count")
        real, slots = totals.pop("real_tokens", None), totals.pop("token_slots", None)
        if real is not None and slots:
            self.log("train/padding_efficiency", (real / slots).item(), on_step=True, batch_size=1)
        if count > 0 and not self._scale_loss:
            scale = (
                self.trainer.accumulate_grad_batches
                * self.trainer.world_size
                * self.loss_divisor
                / count
            )
            for p in self.trainer.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        norm = self._grad_norm()  # Lightning clips after this hook: the norm before clipping
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, batch_size=1)
        if real is not None:
            self._tokens_seen += int(real.item())
            self.log("train/tokens_seen", float(self._tokens_seen), on_step=True, batch_size=1)
        self._log_means("train", totals, count, on_step=True)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Norm clipping under FSDP through the root module's ``clip_grad_norm_``, which
        takes the norm over every shard (Lightning's FSDP precision refuses norm clipping);
        elsewhere Lightning's own."""
        strategy = self.trainer.strategy
        norm = gradient_clip_algorithm is None or gradient_clip_algorithm == "norm"
        if gradient_clip_val and norm and is_fsdp(strategy):
            strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _grad_norm(self) -> float | None:
        """The global L2 norm of the step's gradients (over the shards under FSDP)."""
        grads = [
            local_part(p.grad)[0] for p in self.trainer.model.parameters() if p.grad is not None
        ]
        if not grads:  # DeepSpeed keeps them to itself; a skipped step has none
            return None
        squares = torch.nn.utils.get_total_norm(grads).float() ** 2
        strategy = self.trainer.strategy
        if is_fsdp(strategy) or is_fsdp2(strategy):
            squares = strategy.reduce(squares, reduce_op="sum")
        return squares.sqrt().item()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self._tokens_seen
        checkpoint["data_parallel_size"] = self.trainer.world_size

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._tokens_seen = checkpoint.get("tokens_seen", 0)
        trainer = attached_trainer(self)
        if trainer is not None:  # before Lightning restores the data position from it
            move_data_position(checkpoint, trainer.world_size)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _accumulate(self._eval_sums, self.eval_terms(batch))

    def eval_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        """What evaluation measures of a batch: the objective's terms, unless a subclass
        measures something else (GRPO scores greedy completions)."""
        return self.loss_terms(batch)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def complete(
        self,
        prompts: list[list[dict]],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float | None = None,
    ) -> list[str]:
        """Completions of chat prompts. Under FSDP and ZeRO-3 every rank must call it: the
        ranks decode in lockstep until all are done (``synced_gpus``)."""
        strategy = attached_strategy(self)
        synced = strategy is not None and parameters_are_sharded(strategy)
        return generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens,
            do_sample,
            temperature,
            top_p=top_p,
            synced_gpus=synced and self.trainer.world_size > 1,
        )

    def predict_step(self, batch: list[tuple[list[dict], str]], batch_idx: int) -> list[dict]:
        """Greedy completions of chat prompts: rows of prompt, reference and output."""
        outputs = self.complete([p for p, _ in batch], self.max_new_tokens)
        return [
            {"prompt": p, "reference": r, "output": o}
            for (p, r), o in zip(batch, outputs, strict=True)
        ]

    def _log_eval(self, stage: str) -> None:
        """Means over every unit of the whole evaluation set, across devices."""
        totals = self._reduce(self._eval_sums)
        self._eval_sums = {}
        if self.trainer.sanity_checking or not totals:
            return
        count = totals.pop("count")
        means = self._log_means(stage, totals, count, on_step=False)
        if self.log_perplexity and "loss" in means:
            self.log(f"{stage}/ppl", math.exp(min(means["loss"], 50.0)), sync_dist=False)

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = sorted(sums)  # same order on every rank
        if not keys:
            return {}
        stacked = torch.stack([sums[k].detach().float() for k in keys])
        stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        return dict(zip(keys, stacked, strict=True))

    def _log_means(
        self, stage: str, totals: dict[str, torch.Tensor], count: torch.Tensor, on_step: bool
    ) -> dict[str, float]:
        counts = {k: totals.pop(k) for k in [k for k in totals if k.endswith(COUNT_SUFFIX)]}
        means = {}
        for key, value in totals.items():
            n = counts.get(key + COUNT_SUFFIX)
            if n is not None and n <= 0:
                continue  # no unit of its kind in the step (no desirable row): nothing to log
            means[key] = (value / (count if n is None else n).clamp(min=1)).item()
        for key, value in means.items():
            self.log(
                f"{stage}/{key}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=key == "loss",
                sync_dist=False,
                batch_size=1,
            )
        return means

    # ------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.trainer.model.named_parameters():
            if param.requires_grad:
                (no_decay if model_key(name) in self._no_decay else decay).append(param)
        optimizer = self.optimizer_factory(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        )
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "the number of optimizer steps is unknown (iterable data): set trainer.max_steps"
            )
        total = int(total)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_multiplier(
                self.scheduler, total, warmup_steps(self.warmup, total), self.min_lr_ratio
            ),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1},
        }


def _accumulate(store: dict[str, torch.Tensor], terms: LossTerms) -> None:
    own_counts = {key + COUNT_SUFFIX: n for key, n in terms.counts.items()}
    loss = {} if terms.loss_sum is None else {"loss": terms.loss_sum}
    values = {**loss, "count": terms.count, **terms.sums, **own_counts}
    for key, value in values.items():
        value = value.detach().float().clone()  # never an alias of the objective's tensors
        store[key] = store[key] + value if key in store else value


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's real shape: ZeRO-3 partitions weights as transformers loads them,
    leaving an empty 1-D placeholder whose shape DeepSpeed keeps as ``ds_shape``."""
    return getattr(param, "ds_shape", param.shape)


LIGER = "model.init_args.liger_kernels: true"


def liger_problem() -> str | None:
    """What Liger kernels need and this machine lacks (the package), or None."""
    return missing_requirements(LIGER, packages=("liger_kernel",), instead="or set it to false")


def _apply_liger(model: PreTrainedModel) -> None:
    problem = liger_problem()
    if problem:
        raise ConfigError(problem)
    apply_liger_kernels(model)


@contextmanager
def named_if_missing(name_or_path: str, what: str, key: str | None) -> Iterator[None]:
    """A name that is no local path and that the hub cannot give (a typo, offline, private)
    becomes one ``PathNotFoundError`` naming it, the setting and a nearby directory, not
    transformers' message of several lines."""
    try:
        yield
    except OSError as err:
        if isinstance(err, PathNotFoundError) or Path(name_or_path).expanduser().exists():
            raise  # ours already, or a local directory that is incomplete: its own words
        raise PathNotFoundError(hub_not_found(name_or_path, what, key, err)) from err
