"""Prepared rows as text for a reader: lengths, a histogram, trained tokens marked.

The command ``python -m src.preview`` prints them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from transformers import PreTrainedTokenizerBase

from src.datamodules.chat import IGNORE_INDEX

GREEN, RESET = "\033[42;30m", "\033[0m"


def example_lengths(data: Any, limit: int = 100_000) -> Iterator[int]:
    """Token count of every example (documents of packed rows, responses of pairs)."""
    for i, row in enumerate(data):
        if i == limit:
            return
        if "seq_lengths" in row:
            yield from row["seq_lengths"]
        elif "chosen_input_ids" in row:
            yield len(row["chosen_input_ids"])
            yield len(row["rejected_input_ids"])
        else:
            yield len(row["input_ids"])


def histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 40) -> str:
    if not lengths:
        return "  (empty)"
    step = max(1, -(-max(max(lengths), 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(n // step, bins - 1)] += 1
    top = max(counts)
    lines = [
        f"  {b * step:>6}-{(b + 1) * step - 1:<6} {'#' * round(width * c / top):<{width}} {c}"
        for b, c in enumerate(counts)
    ]
    mean = sum(lengths) / len(lengths)
    lines.append(f"  mean {mean:.1f}, max {max(lengths)} (max_length {max_length})")
    return "\n".join(lines)


def render_row(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], color: bool) -> str:
    """The row as text, trained tokens marked; packed rows document by document."""
    if "chosen_input_ids" in row:
        return "\n".join(
            f"--- {side} ---\n"
            + mark(tokenizer, row[f"{side}_input_ids"], row[f"{side}_labels"], color)
            for side in ("chosen", "rejected")
        )
    ids = row["input_ids"]
    labels = row.get("labels") or ids
    pieces = row.get("seq_lengths") or [len(ids)]
    parts, start = [], 0
    for k, n in enumerate(pieces):
        head = f"--- document {k} ({n} tokens) ---\n" if len(pieces) > 1 else ""
        parts.append(
            head + mark(tokenizer, ids[start : start + n], labels[start : start + n], color)
        )
        start += n
    return "\n".join(parts)


def mark(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], color: bool) -> str:
    """Decoded runs of tokens, the trained runs highlighted."""
    out, run, trained = [], [], None
    for token, label in [*zip(ids, labels, strict=True), (None, None)]:
        is_trained = label is not None and label != IGNORE_INDEX
        if run and (token is None or is_trained != trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            if trained:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            out.append(text)
            run = []
        run.append(token)
        trained = is_trained
    return "".join(out)
