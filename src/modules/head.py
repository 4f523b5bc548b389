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

from collections.abc import Callable, Iterator
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
    with head_replaced(
        model, lambda head, transform: _LeanCall(head, labels, chunk_size, smoothing, transform)
    ) as call:
        yield call


@contextmanager
def head_replaced(
    model: torch.nn.Module, build: Callable[[torch.nn.Module, LogitTransform], Any]
) -> Iterator[Any]:
    """While open, the model's head runs ``build(head, transform)`` as its forward, with the
    family's logit transform (``transform``) switched off in the model's own forward."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings for the lean head")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with neutral_post_head(causal_lm) as transform:
        call = build(head, transform)
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
        dtype, transform = ctx.dtype, ctx.transform
        w = weight.to(dtype)
        vocab = w.shape[0]
        grads = _HeadGrads(hidden, weight, bias, ctx.needs_input_grad[:3])
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
                grads.add(rows, dz.to(dtype), h, w)
        return (*grads.result(), None, None, None, None)


class _HeadGrads:
    """The gradients of a linear head's inputs, added chunk by chunk from each chunk's
    ``dz`` (the gradient of its logits): ``d_hidden = dz @ W``, ``d_weight = dz^T @ h``
    summed in float32 and rounded to the weight's dtype once, ``d_bias = sum(dz)``."""

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        needs: tuple[bool, ...],
    ) -> None:
        self.weight, self.bias, self.hidden_dtype = weight, bias, hidden.dtype
        need_h, need_w, need_b = needs
        float32 = {"dtype": torch.float32, "device": weight.device}
        self.d_hidden = torch.zeros_like(hidden) if need_h else None
        self.d_weight = torch.zeros(weight.shape, **float32) if need_w else None
        self.d_bias = torch.zeros(weight.shape[0], **float32) if need_b else None

    def add(self, rows: slice, dz: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        """Add one chunk's share; ``dz`` and ``w`` in the compute dtype."""
        if self.d_hidden is not None:
            self.d_hidden[rows] = (dz @ w).to(self.hidden_dtype)
        if self.d_weight is not None and dz.dtype == torch.float32:
            self.d_weight.addmm_(dz.t(), h.float())
        elif self.d_weight is not None:
            self.d_weight.add_(dz.t() @ h.to(dz.dtype))
        if self.d_bias is not None:
            self.d_bias.add_(dz.float().sum(0))

    def result(self) -> tuple[torch.Tensor | None, ...]:
        d_weight, d_bias = self.d_weight, self.d_bias
        return (
            self.d_hidden,
            d_weight.to(self.weight.dtype) if d_weight is not None else None,
            d_bias.to(self.bias.dtype) if d_bias is not None else None,
        )


# --------------------------------------------- any per-token function of the logits
# ``fn(z, rows)``: the student's float32 logits ``z`` of the label tokens ``rows`` (a slice of
# the label order) -> ``(len(rows), width)`` float32 results, differentiable in ``z``.
ChunkFn = Callable[[torch.Tensor, slice], torch.Tensor]


def label_map(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    fn: ChunkFn,
    width: int,
    path: HeadPath = "lean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``(N, width)``: ``fn`` of the logits of the N label tokens of ``batch``, in the order of
    ``labels[:, 1:] != -100``. ``lean`` runs ``fn`` inside the head's forward, ``chunk_size``
    tokens at a time (``ChunkedMap``), so no full logits exist; ``full`` runs it once on the
    logits of every label position of the model's output (the reference path)."""
    mask, _ = next_token_targets(batch["labels"])
    if path == "full":
        z = logits_of(model, batch)[:, :-1][mask].float()
        return fn(z, slice(0, z.shape[0]))
    with head_replaced(
        model, lambda head, transform: _MapCall(head, mask, fn, width, chunk_size, transform)
    ):
        return logits_of(model, batch)  # what the head returned: (N, width)


class _MapCall:
    """The head's forward inside ``label_map``: ``fn`` on the label positions' logits."""

    def __init__(
        self,
        head: torch.nn.Module,
        mask: torch.Tensor,
        fn: ChunkFn,
        width: int,
        chunk_size: int,
        transform: LogitTransform,
    ) -> None:
        self.head, self.mask, self.fn, self.width = head, mask, fn, width
        self.chunk_size, self.transform = chunk_size, transform

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        picked = hidden[:, :-1][self.mask.to(hidden.device)]
        if type(self.head) is torch.nn.Linear:
            head = self.head
            return ChunkedMap.apply(
                picked, head.weight, head.bias, self.fn, self.width, self.chunk_size, self.transform
            )
        forward = type(self.head).forward  # the class's: the instance's is this object
        outs = [
            checkpoint(
                _chunk_map,
                lambda x: forward(self.head, x),
                picked[rows],
                rows,
                self.fn,
                self.transform,
                use_reentrant=False,
            )
            for rows in _chunks(picked.shape[0], self.chunk_size)
        ]
        return torch.cat(outs) if outs else picked.new_zeros(0, self.width, dtype=torch.float32)


def _chunk_map(
    head: Any, hidden: torch.Tensor, rows: slice, fn: ChunkFn, transform: LogitTransform
) -> torch.Tensor:
    return fn(transform(head(hidden).float()), rows)


class ChunkedMap(torch.autograd.Function):
    """``(N, width)`` results of ``fn`` (see ``ChunkFn``) for hidden states ``(N, H)`` and a
    linear head ``weight (V, H)``, one ``(chunk, V)`` block of float32 logits at a time.

    Forward keeps no logits; backward recomputes each block, runs ``fn`` on it under autograd
    for ``dz``, and turns ``dz`` into the gradients of the hidden states, the weight (summed in
    float32) and the bias as ``ChunkedHead`` does. ``fn`` may read other tensors (a teacher's
    logits of the same rows); they get no gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fn: ChunkFn,
        width: int,
        chunk_size: int,
        transform: LogitTransform,
    ) -> torch.Tensor:
        dtype = _compute_dtype(weight)
        w = weight.to(dtype)
        out = torch.zeros(hidden.shape[0], width, dtype=torch.float32, device=hidden.device)
        with _no_autocast(hidden):
            for rows in _chunks(hidden.shape[0], chunk_size):
                z = transform(_logits(hidden[rows], w, bias, dtype), inplace=True)
                out[rows] = fn(z, rows)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.fn, ctx.chunk_size, ctx.transform, ctx.dtype = fn, chunk_size, transform, dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias = ctx.saved_tensors
        dtype = ctx.dtype
        w = weight.to(dtype)
        grads = _HeadGrads(hidden, weight, bias, ctx.needs_input_grad[:3])
        with _no_autocast(hidden):
            for rows in _chunks(hidden.shape[0], ctx.chunk_size):
                h = hidden[rows]
                y = _logits(h, w, bias, dtype).requires_grad_()  # a leaf: the head's output
                with torch.enable_grad():
                    out = ctx.fn(ctx.transform(y), rows)
                    (dy,) = torch.autograd.grad(out, y, grad_out[rows].float())
                grads.add(rows, dy.to(dtype), h, w)
        return (*grads.result(), None, None, None, None)


def _chunks(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, start + chunk_size)


# ---------------------------------------------- another model's logits, chunk by chunk
@dataclass
class LabelLogits:
    """A model's logits at the label positions of a batch, one block of rows at a time.

    Either the head's inputs ``hidden (N, H)`` with its ``weight`` and ``bias`` (each block
    computed when asked, in ``dtype``: no ``(N, V)`` tensor), or ``logits (N, V)`` computed
    already; ``transform`` is the family's, applied to each block.
    """

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    transform: LogitTransform = LogitTransform()
    dtype: torch.dtype = torch.float32

    def rows(self, rows: slice) -> torch.Tensor:
        """Float32 logits ``(len(rows), V)`` of the label tokens ``rows``."""
        if self.logits is not None:
            return self.transform(self.logits[rows].float())
        with _no_autocast(self.hidden):
            return self.transform(_logits(self.hidden[rows], self.weight, self.bias, self.dtype))


def label_logits(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    path: HeadPath = "lean",
    logits_now: bool = False,
) -> LabelLogits:
    """``model``'s logits at the label positions of ``batch`` (a frozen model: no gradients).

    ``lean`` keeps the head's inputs from the model's forward and the head's weight, and the
    logits are computed block by block when asked. With ``logits_now`` (the weight is whole
    only inside the forward: FSDP, ZeRO-3) or a head that is no ``nn.Linear``, the head
    computes the label positions' logits ``(N, V)`` inside its forward, in the model's dtype.
    ``full`` takes them from the model's logits of every position (the reference path).
    """
    mask, _ = next_token_targets(batch["labels"])
    if path == "full":
        return LabelLogits(logits=logits_of(model, batch)[:, :-1][mask])
    with head_replaced(
        model, lambda head, transform: _CaptureCall(head, mask, transform, logits_now)
    ) as call:
        logits_of(model, batch)
    return call.captured


class _CaptureCall:
    """The head's forward inside ``label_logits``: keeps what the label logits need."""

    def __init__(
        self, head: torch.nn.Module, mask: torch.Tensor, transform: LogitTransform, now: bool
    ) -> None:
        self.head, self.mask, self.transform, self.now = head, mask, transform, now
        self.captured = LabelLogits(transform=transform)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        picked = hidden[:, :-1][self.mask.to(hidden.device)]
        head = self.head
        if self.now or type(head) is not torch.nn.Linear:
            logits = type(head).forward(head, picked)  # the class's: the instance's is this
            self.captured = LabelLogits(logits=logits, transform=self.transform)
        else:
            dtype = _compute_dtype(head.weight)
            weight = head.weight.to(dtype)  # cast once, not once per block
            self.captured = LabelLogits(picked, weight, head.bias, None, self.transform, dtype)
        return hidden.new_zeros(0)  # the model's own logits: nothing is asked of them


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
