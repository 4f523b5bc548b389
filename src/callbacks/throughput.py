"""Throughput, model FLOPs utilisation and peak memory, logged every N optimizer steps."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from src.compat import logged_step
from src.strategies import is_fsdp

# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), matched in order against
# torch.cuda.get_device_name(): the more specific names first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),  # SXM and PCIe alike
)


def device_peak_tflops(name: str | None) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU named like ``torch.cuda.get_device_name()``,
    or None for a device not in ``PEAK_TFLOPS``."""
    upper = (name or "").upper()
    return next((peak for key, peak in PEAK_TFLOPS if key in upper), None)


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def flops_per_token(config: Any, n_params: float, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, PaLM's accounting (appendix B).

    ``6 * N + 12 * n_layers * n_heads * head_dim * seq_len``: 6N for the matmuls with the
    weights (2N forward, 4N backward: input and weight gradients), and 12·L·H·Q·T for the
    attention scores and the attention-weighted values, each 2·Q·T per head and token
    forward, 3x with backward. ``N`` comes from ``non_embedding_params``; ``seq_len`` is the
    row length. Causal masking, packing's block-diagonal masks and sliding windows are not
    discounted (the kernels compute full rows), nor is recomputation counted: these are
    model FLOPs, not hardware FLOPs.

    Args:
        config: A transformers config (its text config for multimodal ones).
        n_params: N, the parameters whose matmuls run once per token.
        seq_len: Row length T in tokens.
    """
    config = _text_config(config)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6.0 * n_params + 12.0 * layers * heads * head_dim * seq_len


def _numel(p: torch.Tensor) -> int:
    """The full element count of a parameter (ZeRO-3 partitions, 4-bit packed weights)."""
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def _local_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(all parameters, input embedding, LM head when it is the embedding matrix)."""
    total = sum(_numel(p) for p in model.parameters())  # each shared tensor once
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_n = _numel(embed.weight) if embed is not None else 0
    tied = head is not None and embed is not None and head.weight is embed.weight
    return total, embed_n, embed_n if tied else 0


def non_embedding_params(model: torch.nn.Module) -> int:
    """N for ``flops_per_token``: every parameter but the input embedding matrix.

    The embedding is a lookup, not a matmul, so it is left out. The LM head is a matmul
    (2·V·d FLOPs per token forward), so it counts even when ``tie_word_embeddings`` shares
    its matrix with the embedding. Frozen parameters count too (LoRA, QLoRA: their forward
    and the input-gradient matmul of their backward still run, so 6N overstates a LoRA step,
    which skips the frozen weights' gradient matmul, by at most 1.5x: an upper bound, in the
    usual convention). Every expert of a mixture of experts would count: dense models only.
    """
    total, embed, tied_head = _local_counts(model)
    return total - embed + tied_head


def _model_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):  # a peft wrapper
        config = getattr(model.get_base_model(), "config", None)
    return config


def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _row_tensor(batch: dict[str, Any]) -> torch.Tensor | None:
    """A tensor of the batch shaped (rows, row length): its first 2-D one (see collate.py)."""
    return next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() == 2), None)


class Throughput(pl.Callback):
    """Log throughput, MFU and peak memory every ``every_n_steps`` optimizer steps.

    Each value is an average over the window since the previous log (wall-clock, by
    ``time.perf_counter``; validation, and the samples generated in it, are left out of the
    window, checkpoint saves are not), over all ranks, logged by global rank 0 at the step of
    that optimizer step's ``train/loss``:

    - ``train/tokens_per_sec``: real (non-pad) tokens per second over all ranks: the batches'
      ``real_tokens`` (chosen + rejected for preference pairs), else every token slot (the
      batches' ``token_slots``).
    - ``train/samples_per_sec``: batch rows per second over all ranks (a preference pair is one
      sample, a packed SFT row one sample, a packed preference row as many as its pairs: the
      batches' ``examples``).
    - ``train/mfu``: model FLOPs utilisation, the model FLOP/s achieved per device over the
      device's dense bf16 peak. Model FLOPs are ``flops_per_token(config, N, T)`` times the
      real tokens, T each batch's row length, N from ``non_embedding_params``; padding
      therefore lowers MFU. A DPO reference model's forward is not counted. Only on a GPU in
      ``PEAK_TFLOPS`` (A100 312, H100 SXM 989, H200 989 TFLOP/s) or with ``peak_tflops``.
    - ``train/peak_memory_gb``: the largest ``torch.cuda.max_memory_allocated`` of any rank
      in the window, in GiB (CUDA only).
    - ``train/padding_efficiency_avg``: real tokens over token slots in the window (the module's
      ``train/padding_efficiency`` is the same per step).

    Args:
        every_n_steps: Optimizer steps per log (and per averaging window).
        peak_tflops: The device's peak TFLOP/s for MFU, overriding the table (and giving
            MFU on devices the table lacks).
    """

    def __init__(self, every_n_steps: int = 10, peak_tflops: float | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"Throughput every_n_steps must be >= 1, not {every_n_steps}")
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"Throughput peak_tflops must be > 0, not {peak_tflops}")
        self.every_n_steps = every_n_steps
        self.peak_tflops = peak_tflops
        self._config: Any = None
        self._n_params = 0
        self._peak_flops: float | None = None  # FLOP/s of one device
        self._cuda = False
        self._device = torch.device("cpu")
        self._dtype = torch.float64
        self._reset()

    def _reset(self) -> None:
        self._window_start: float | None = None
        self._paused_at: float | None = None
        self._last_step = -1
        self._real: torch.Tensor | float = 0.0  # stays on the device: no sync per batch
        self._flops: torch.Tensor | float = 0.0
        self._samples = 0
        self._slots = 0

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self._last_step = trainer.global_step
        model = getattr(pl_module, "model", None)
        model = pl_module if model is None else model
        self._config = _model_config(model)
        self._device = pl_module.device
        self._cuda = self._device.type == "cuda"
        self._dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
        self._n_params = 0
        why = None
        if self._config is None or not hasattr(model, "get_input_embeddings"):
            why = f"{type(model).__name__} has no transformers config"
        else:
            counts = torch.tensor(_local_counts(model), dtype=torch.float64)
            if is_fsdp(trainer.strategy):  # each rank holds a shard of every parameter
                counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum")
            total, embed, tied_head = (int(c) for c in counts.tolist())
            self._n_params = total - embed + tied_head
        name = _device_name(pl_module.device)
        peak = self.peak_tflops or device_peak_tflops(name)
        if why is None and peak is None:
            why = f"no dense bf16 peak is known for {name or pl_module.device.type}"
            why += " (set peak_tflops)"
        self._peak_flops = None if why else peak * 1e12
        if why:
            rank_zero_info(f"Throughput: train/mfu is not logged: {why}")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_start is None:
            self._start_window()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if isinstance(batch, dict):
            self._count(batch)
        step = trainer.global_step
        if step == self._last_step:  # inside gradient accumulation
            return
        self._last_step = step
        if step % self.every_n_steps == 0 and self._window_start is not None:
            self._log(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window_start is not None and trainer.state.fn == "fit":
            self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._paused_at is not None and self._window_start is not None:
            self._window_start += time.perf_counter() - self._paused_at
        self._paused_at = None

    # ---------------------------------------------------------------- helpers
    def _start_window(self) -> None:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self._device)
        self._window_start = time.perf_counter()
        self._real, self._flops, self._samples, self._slots = 0.0, 0.0, 0, 0

    def _count(self, batch: dict[str, Any]) -> None:
        rows = _row_tensor(batch)
        if rows is None:
            return
        # the collator's counts; a batch of another collator: one id tensor, no padding
        slots = self._as_count(batch.get("token_slots"), rows.numel())
        real = self._as_count(batch.get("real_tokens"), slots)
        self._real = self._real + real
        if self._peak_flops is not None:
            self._flops = self._flops + real * flops_per_token(
                self._config, self._n_params, rows.shape[1]
            )
        self._samples = self._samples + self._as_count(batch.get("examples"), rows.shape[0])
        self._slots = self._slots + slots

    def _as_count(self, value: Any, default: Any) -> Any:
        return value.detach().to(self._dtype) if isinstance(value, torch.Tensor) else default

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.perf_counter() - self._window_start
        memory = torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if self._cuda else 0.0
        values = [self._real, self._flops, self._samples, self._slots, elapsed, memory]
        local = torch.stack([torch.as_tensor(v, dtype=self._dtype).cpu() for v in values])
        local = local.to(pl_module.device)
        rows = trainer.strategy.all_gather(local).reshape(-1, len(values)).cpu()
        self._start_window()
        real, flops, samples, slots = rows[:, :4].sum(0).tolist()
        elapsed, memory = rows[:, 4].max().item(), rows[:, 5].max().item()
        if not trainer.is_global_zero or not trainer.loggers or elapsed <= 0:
            return
        metrics = {
            "train/tokens_per_sec": real / elapsed,
            "train/samples_per_sec": samples / elapsed,
        }
        if slots:
            metrics["train/padding_efficiency_avg"] = real / slots
        if self._peak_flops is not None:
            metrics["train/mfu"] = flops / elapsed / rows.shape[0] / self._peak_flops
        if self._cuda:
            metrics["train/peak_memory_gb"] = memory
        step = logged_step(trainer)  # that of train/loss
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
