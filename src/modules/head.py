"""The LM head without the full logits: label-token log-probabilities chunk by chunk.

A causal LM's last matrix maps each position's hidden state to a vocabulary of logits; at
real vocabularies (150k) those logits, and their float32 copies, are most of a step's
memory. Every objective only needs a few numbers per *label* token: its log-probability, the
mean log-probability over the vocabulary (label smoothing), and whether the argmax is right.

``label_logps(model, batch)`` gives those numbers (``LabelLogps``) in one of two ways:

- ``lean`` (default): inside the model's own forward, the head module receives the hidden
  states; only the label positions are kept, and they go through the head ``chunk_size``
  tokens at a time. A plain ``nn.Linear`` head (tied or not) runs in ``ChunkedHead``, which
  keeps one chunk of logits at a time and recomputes it in backward; any other head (a LoRA
  wrapper, a quantised layer) runs chunk by chunk under activation checkpointing. Running
  inside the forward is what makes it safe under FSDP, FSDP2 and ZeRO-3: the head's weight
  is gathered by the sharder exactly as for a normal forward, never read from a shard.
- ``full``: the model returns the logits of every position and they are reduced in float32
  (the reference path, for comparison).

Families that transform the logits after the head (Gemma 2's soft-capping, Cohere's and
Granite's scaling) get the same transform inside the chunks (``post_head_transform``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint

from src.modules.losses import LabelLogps, label_logps_from_logits, next_token_targets

HeadPath = Literal["lean", "full"]
DEFAULT_CHUNK_SIZE = 512  # 512 x 151,936 float32 logits: 311 MB a chunk
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class LogitTransform:
    """What a family does to the head's output before it returns logits: ``z = y * scale``,
    then, with ``cap``, ``z = cap * tanh(z / cap)``."""

    scale: float = 1.0
    cap: float | None = None

    def __call__(self, y: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``z`` of ``y``; ``inplace`` overwrites ``y`` (a buffer outside autograd)."""
        if self.scale != 1.0:
            y = y.mul_(self.scale) if inplace else y * self.scale
        if self.cap is not None:
            y = (
                y.div_(self.cap).tanh_().mul_(self.cap)
                if inplace
                else torch.tanh(y / self.cap) * self.cap
            )
        return y

    def grad_factor(self, z: torch.Tensor) -> torch.Tensor | float:
        """``dz/dy`` elementwise at ``z`` (a number where it is one everywhere alike)."""
        if self.cap is None:
            return self.scale
        return (1 - (z / self.cap) ** 2).mul_(self.scale)


def label_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    path: HeadPath = "lean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    smoothing: bool = False,
    labels: torch.Tensor | None = None,
) -> LabelLogps:
    """Log-probabilities of the label tokens of ``batch`` (``labels``, else ``batch["labels"]``)
    under ``model``; ``smoothing`` also computes the mean over the vocabulary."""
    labels = batch["labels"] if labels is None else labels
    if path == "full":
        return label_logps_from_logits(logits_of(model, batch), labels, smoothing)
    with lean_head(model, labels, chunk_size, smoothing) as head:
        out = logits_of(model, batch)  # what the head returned: (N, 2)
    return LabelLogps(out[:, 0], out[:, 1] if smoothing else None, head.correct, head.mask)


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output for a batch; ``use_cache=False`` so that packed rows get a
    block-diagonal mask from their ``position_ids``."""
    return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, use_cache=False).logits


@contextmanager
def lean_head(
    model: torch.nn.Module, labels: torch.Tensor, chunk_size: int, smoothing: bool
) -> Iterator[_LeanCall]:
    """While open, the model's head returns ``(N, 2)``: each label token's log-probability
    and mean log-probability, in the order of ``labels[:, 1:] != -100``."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings for the lean head")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with neutral_post_head(causal_lm) as transform:
        call = _LeanCall(head, labels, chunk_size, smoothing, transform)
        head.forward = call  # an instance attribute: the sharders' hooks still run around it
        try:
            yield call
        finally:
            del head.forward


class _LeanCall:
    """The head's forward while ``lean_head`` is open."""

    def __init__(
        self,
        head: torch.nn.Module,
        labels: torch.Tensor,
        chunk_size: int,
        smoothing: bool,
        transform: LogitTransform,
    ) -> None:
        self.head, self.chunk_size, self.smoothing = head, chunk_size, smoothing
        self.transform = transform
        self.mask, self.targets = next_token_targets(labels)
        self.correct = torch.zeros(0, dtype=torch.bool)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        picked = hidden[:, :-1][self.mask]  # prompt and padding never reach the head
        targets = self.targets.to(picked.device)
        if type(self.head) is torch.nn.Linear:
            out, self.correct = ChunkedHead.apply(
                picked,
                self.head.weight,
                self.head.bias,
                targets,
                self.chunk_size,
                self.smoothing,
                self.transform,
            )
            return out
        outs, rights = [], []
        forward = type(self.head).forward  # the class's: the instance's is this object
        for start in range(0, picked.shape[0], self.chunk_size):
            stop = start + self.chunk_size
            out, right = checkpoint(
                _chunk_logps,
                lambda x: forward(self.head, x),
                picked[start:stop],
                targets[start:stop],
                self.smoothing,
                self.transform,
                use_reentrant=False,
            )
            outs.append(out)
            rights.append(right)
        self.correct = torch.cat(rights) if rights else self.correct
        return torch.cat(outs) if outs else picked.new_zeros(0, 2, dtype=torch.float32)


def _chunk_logps(
    head: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    smoothing: bool,
    transform: LogitTransform,
) -> tuple[torch.Tensor, torch.Tensor]:
    z = transform(head(hidden).float())
    logprobs = torch.log_softmax(z, dim=-1)
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)
    mean = logprobs.mean(-1) if smoothing else torch.zeros_like(logp)
    return torch.stack([logp, mean], 1), z.argmax(-1) == targets


class ChunkedHead(torch.autograd.Function):
    """``(N, 2)`` log-probability and mean log-probability of each target, and whether the
    argmax hits it, for hidden states ``(N, H)`` and a linear head ``weight (V, H)``.

    One ``(chunk, V)`` block of float32 logits exists at a time; backward recomputes each
    block from the saved hidden states and log-sum-exps. The matmuls run in the weight's
    dtype, or autocast's when it is on, as ``nn.Linear`` would.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        smoothing: bool,
        transform: LogitTransform,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(weight)
        w = weight.to(dtype)
        n = hidden.shape[0]
        out = torch.zeros(n, 2, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        with _no_autocast(hidden):
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                z = transform(_logits(hidden[rows], w, bias, dtype), inplace=True)
                out[rows, 0] = z.gather(1, targets[rows, None]).squeeze(1)
                if smoothing:
                    out[rows, 1] = z.mean(-1)
                correct[rows] = z.argmax(-1) == targets[rows]
                lse[rows] = _logsumexp_(z)  # z is spent: one chunk of logits at a time
                out[rows] -= lse[rows, None]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.smoothing, ctx.transform, ctx.dtype = (
            chunk_size,
            smoothing,
            transform,
            dtype,
        )
        ctx.mark_non_differentiable(correct)
        return out, correct

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, transform = ctx.dtype, ctx.transform
        w = weight.to(dtype)
        vocab = w.shape[0]
        d_hidden = torch.zeros_like(hidden) if need_h else None
        # summed over chunks in float32, rounded to the weight's dtype once
        d_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        d_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        with _no_autocast(hidden):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden[rows]
                z = transform(_logits(h, w, bias, dtype), inplace=True)
                factor = transform.grad_factor(z)
                a, b = grad_out[rows, :1].float(), grad_out[rows, 1:].float()
                # d(logp_t)/dz = onehot - p; d(mean logp)/dz = 1/V - p; p in z's buffer
                dz = z.sub_(lse[rows, None]).exp_().mul_(-(a + b))
                dz.scatter_add_(1, targets[rows, None], a)
                if ctx.smoothing:
                    dz.add_(b / vocab)
                if not isinstance(factor, float) or factor != 1.0:
                    dz.mul_(factor)
                dz = dz.to(dtype)
                if need_h:
                    d_hidden[rows] = (dz @ w).to(hidden.dtype)
                if need_w and dtype == torch.float32:
                    d_weight.addmm_(dz.t(), h.float())
                elif need_w:
                    d_weight.add_(dz.t() @ h.to(dtype))
                if need_b:
                    d_bias.add_(dz.float().sum(0))
        return (
            d_hidden,
            d_weight.to(weight.dtype) if d_weight is not None else None,
            d_bias.to(bias.dtype) if d_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def _logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    y = hidden.to(dtype) @ weight.t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y.float()


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z, -1)``, computed in ``z``'s own buffer (overwritten)."""
    top = z.amax(-1, keepdim=True)
    return z.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(1))


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    kind = weight.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


@contextmanager
def _no_autocast(like: torch.Tensor) -> Iterator[None]:
    with torch.autocast(like.device.type, enabled=False):
        yield


# ------------------------------------------------------- families' logit transforms
# Each entry: (where the setting lives, its name, how it enters LogitTransform, the value
# that makes the family's own code a no-op). Read in the model's forward, so setting the
# neutral value for the lean forward moves the transform into the chunks instead.
_POST_HEAD = (
    ("config", "final_logit_softcapping", "cap", None),  # Gemma 2, Gemma 3
    ("config", "logits_scaling", "divide", 1.0),  # Granite: logits / logits_scaling
    ("module", "logit_scale", "scale", 1.0),  # Cohere: logits * logit_scale
)


def post_head_transform(causal_lm: torch.nn.Module) -> LogitTransform:
    """The transform ``causal_lm`` applies to its head's output (identity for most)."""
    scale, cap = 1.0, None
    for where, name, kind, neutral in _POST_HEAD:
        owner = causal_lm.config if where == "config" else causal_lm
        value = getattr(owner, name, neutral)
        if not _is_number(value) or value == neutral:
            continue
        if kind == "cap":
            cap = float(value)
        elif kind == "divide":
            scale /= float(value)
        else:
            scale *= float(value)
    return LogitTransform(scale, cap)


@contextmanager
def neutral_post_head(causal_lm: torch.nn.Module) -> Iterator[LogitTransform]:
    """The family's transform, switched off in its own forward while open."""
    transform = post_head_transform(causal_lm)
    saved = []
    for where, name, _, neutral in _POST_HEAD:
        owner = causal_lm.config if where == "config" else causal_lm
        if _is_number(getattr(owner, name, None)):
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, neutral)
    try:
        yield transform
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
