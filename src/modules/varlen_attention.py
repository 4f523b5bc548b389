"""``attn_implementation: sdpa_varlen``: sdpa that attends within each packed sequence.

A packed row (``position_ids`` restarting at 0 for each sequence, no attention mask) gets a
block-diagonal mask from transformers under plain ``sdpa``, and its attention costs the
square of the row length whatever its sequences: a row of 1024 tokens holding 30 sequences
of 34 pays 30 times the attention of its sequences. Here each sequence's causal attention
runs on its own, as flash-attention's variable-length kernels do on a GPU, and the result is
the same (the mask allows nothing across sequences). Rows that are not packed (padded
batches, generation) go through transformers' ``sdpa`` unchanged. Meant for CPUs: on a GPU,
``flash_attention_2`` does the same in one kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, varlen_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An attention function of transformers' interface: ``query`` (B, heads, T, D), ``key``
    and ``value`` (B, kv heads, T, D); returns (B, T, heads, D)."""
    segments = packed_segments(kwargs.get("position_ids"), query.shape[2], key.shape[2])
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, bounds in enumerate(segments):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, start:stop],
                key[b : b + 1, :, start:stop],
                value[b : b + 1, :, start:stop],
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
                enable_gqa=gqa,
            )
            for start, stop in zip(bounds, bounds[1:], strict=False)
        ]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def packed_segments(
    position_ids: torch.Tensor | None, q_length: int, kv_length: int
) -> list[list[int]] | None:
    """Each row's sequence boundaries ``[0, s1, ..., T]`` when the rows are packed: every
    position is 0 or one more than the one before, and some row holds two sequences or
    more. None otherwise (not packed, left-padded prompts, a key cache)."""
    if position_ids is None or q_length != kv_length or q_length < 2:
        return None
    positions = position_ids.detach().cpu()
    if positions.shape[-1] != q_length:
        return None
    step = positions[:, 1:] - positions[:, :-1]
    if not bool(((step == 1) | (positions[:, 1:] == 0)).all()) or bool(
        (positions[:, 0] != 0).any()
    ):
        return None
    starts = positions == 0
    if int(starts.sum()) == positions.shape[0]:
        return None  # one sequence a row: nothing to split
    return [[*row.nonzero().flatten().tolist(), q_length] for row in starts]
