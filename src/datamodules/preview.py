"""Check the data before spending GPU hours: statistics and examples with trained tokens marked.

    python -m src.datamodules.preview --config configs/sft.yaml [-n 3] [--split val]
    python -m src.datamodules.preview --check-template --config configs/sft.yaml
    python -m src.datamodules.preview --check-template --tokenizer path/to/model

Any further ``--data...`` arguments override the config, as with ``train.py``. Trained
tokens are shown in green on a terminal, or between ``[[`` and ``]]`` otherwise.
``--check-template`` probes the chat template instead (see ``template_check.py``) and exits
with status 1 when a probe fails.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from transformers import PreTrainedTokenizerBase

from src.datamodules.base import BaseDataModule
from src.datamodules.chat import IGNORE_INDEX, ChatEncoder
from src.datamodules.records import DataError
from src.datamodules.template_check import check_template

GREEN, RESET = "\033[42;30m", "\033[0m"


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.datamodules.preview", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", action="append", help="a training config")
    parser.add_argument(
        "--check-template", action="store_true", help="probe the chat template and judge it"
    )
    parser.add_argument("--tokenizer", help="with --check-template: a tokenizer, no config")
    parser.add_argument("--chat-template", help="with --tokenizer: a built-in name or a file")
    parser.add_argument("--stop-token", help="with --tokenizer: as data.stop_token")
    parser.add_argument(
        "--reasoning", default="template", choices=["template", "strip", "keep_last", "keep_all"]
    )
    parser.add_argument("-n", "--examples", type=int, default=3, help="examples to render")
    parser.add_argument("--split", choices=["train", "val"], default="train")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    args, overrides = parser.parse_known_args(argv)
    color = args.color == "always" or (args.color == "auto" and out.isatty())
    if args.check_template and args.tokenizer:
        return _check_tokenizer(args, out)
    if not args.config:
        parser.error("--config is required (or --check-template --tokenizer PATH)")

    from src.cli import cli_main  # the same parsing and defaults as train.py

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")

    config_args = [a for path in args.config for a in ("--config", path)]
    try:
        cli = cli_main([*config_args, *overrides], run=False)
        dm: BaseDataModule = cli.datamodule
        if not args.check_template:
            dm.prepare_data()
            dm.setup("fit")
    except Exception as err:  # ours, or jsonargparse's wrapping of ours: one line, as train.py
        found = _ours(err)
        if found is None:
            raise
        print(found, file=sys.stderr)
        return 1
    if args.check_template:
        return 0 if check_template(dm.chat_encoder(), out) else 1
    for split, stats in dm.stats.items():
        print(stats.summary(split), file=out)
    data = dm.datasets[args.split]
    if not hasattr(data, "__len__"):
        print(f"\n{args.split}: streamed; showing its first rows", file=out)
    print(f"\n{args.split} lengths (tokens per example):", file=out)
    print(histogram(list(example_lengths(data)), dm.max_length), file=out)
    for i, row in enumerate(data):
        if i == args.examples:
            break
        print(f"\n=== {args.split} row {i} ===", file=out)
        print(render_row(dm.tokenizer, row, color), file=out)
    return 0


def _ours(err: BaseException | None) -> str | None:
    """The one-line message of the error of ours behind ``err`` (the parser re-raises what a
    class raises while it is built, caused by the original), or None."""
    from src.errors import ConfigError, PathNotFoundError, one_line

    while err is not None:
        for kind, prefix in ((DataError, "data error"), (ConfigError, "config error")):
            if isinstance(err, kind):
                return f"{prefix}: {one_line(err)}"
        if isinstance(err, PathNotFoundError):
            return f"error: {one_line(err)}"
        err = err.__cause__
    return None


def _check_tokenizer(args: argparse.Namespace, out: TextIO) -> int:
    from src.datamodules.base import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer, chat_template=args.chat_template)
        stops = [args.stop_token] if args.stop_token else []
        encoder = ChatEncoder(tokenizer, "assistant", stops, args.reasoning)
        return 0 if check_template(encoder, out) else 1
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


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


if __name__ == "__main__":
    sys.exit(main())
