"""Train a byte-level BPE tokenizer on your own corpus, for pretraining from scratch.

    python scripts/train_tokenizer.py --corpus data/corpus/ --out tokenizers/mine --vocab-size 32000

The corpus is read like training data (.txt/.jsonl/.json/.parquet/.csv files, directories,
globs; the ``text`` field of each row, or ``--field``). The output directory loads with
``AutoTokenizer.from_pretrained`` and carries a ChatML chat template whose end-of-turn token
``<|im_end|>`` is the EOS, so the same tokenizer serves pretraining, SFT and DPO.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.datamodules.records import DataError, iter_records  # noqa: E402
from src.datamodules.templates import resolve_chat_template  # noqa: E402

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def corpus_texts(sources: list[str], field: str, max_rows: int | None) -> Iterator[str]:
    n = 0
    for source in sources:
        for record in iter_records(source):
            text = record.row.get(field)
            if not isinstance(text, str):
                raise DataError(f"{record.where}: no text field {field!r} (set --field)")
            if text:
                yield text
                n += 1
                if max_rows is not None and n >= max_rows:
                    return


def train(texts: Iterator[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save(tokenizer: Tokenizer, out: Path, max_length: int) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    wrapped.chat_template = resolve_chat_template("chatml")
    wrapped.save_pretrained(out)
    return wrapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", nargs="+", required=True, help="files, directories, globs")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--field", default="text", help="the text field of jsonl/parquet rows")
    parser.add_argument("--max-rows", type=int, default=None, help="train on the first N texts")
    parser.add_argument("--max-length", type=int, default=4096, help="model_max_length")
    args = parser.parse_args(argv)
    try:
        texts = corpus_texts(args.corpus, args.field, args.max_rows)
        tokenizer = train(texts, args.vocab_size, args.min_frequency)
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 1
    save(tokenizer, args.out, args.max_length)
    print(f"tokenizer with {tokenizer.get_vocab_size()} tokens written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
