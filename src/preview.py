"""Check the data before spending GPU hours: statistics and examples with trained tokens marked.

    python -m src.preview --config configs/sft.yaml [-n 3] [--split val]
    python -m src.preview --check-template --config configs/sft.yaml
    python -m src.preview --check-template --tokenizer path/to/model

Any further ``--data...`` arguments override the config, as with ``train.py``. Trained
tokens are shown in green on a terminal, or between ``[[`` and ``]]`` otherwise.
``--check-template`` probes the chat template instead (see ``template_check.py``) and exits
with status 1 when a probe fails.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import TextIO

from src.datamodules.base import BaseDataModule
from src.datamodules.chat import ChatEncoder
from src.datamodules.preview import example_lengths, histogram, render_row
from src.datamodules.records import DataError
from src.datamodules.template_check import check_template
from src.datamodules.tokenizer import load_tokenizer
from src.errors import ConfigError, PathNotFoundError, one_line


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.preview", description=__doc__.split("\n")[0]
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

    from src.cli import cli_main  # here: --tokenizer alone needs none of the CLI's imports

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")

    config_args = [a for path in args.config for a in ("--config", path)]
    try:
        cli = cli_main([*config_args, *overrides], run=False)  # as train.py parses
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
    while err is not None:
        for kind, prefix in ((DataError, "data error"), (ConfigError, "config error")):
            if isinstance(err, kind):
                return f"{prefix}: {one_line(err)}"
        if isinstance(err, PathNotFoundError):
            return f"error: {one_line(err)}"
        err = err.__cause__
    return None


def _check_tokenizer(args: argparse.Namespace, out: TextIO) -> int:
    try:
        tokenizer = load_tokenizer(args.tokenizer, chat_template=args.chat_template)
        stops = [args.stop_token] if args.stop_token else []
        encoder = ChatEncoder(tokenizer, "assistant", stops, args.reasoning)
        return 0 if check_template(encoder, out) else 1
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
