"""SFT data preparation: this template's ``SFTDataModule`` against TRL's ``SFTTrainer``.

Both paths get the same synthetic Alpaca-like conversations and the same tokenizer, pack by
best-fit-decreasing into rows of ``--max-length`` and train on the assistant turn only:

* ours: ``SFTDataModule(...).setup("fit")`` on a JSONL of OpenAI ``messages`` (reading the
  file, chat template rendering, assistant-only labels, BFD packing, Arrow dataset);
* TRL: ``SFTTrainer._prepare_dataset`` on the conversational prompt/completion form (its
  completion-only loss path), ``packing_strategy="bfd"``, with ``datasets`` caching off.

Run from the repository root: ``python bench/data.py [--n 20000] [--repeats 3]``.

``--file PATH [--format alpaca]`` runs the same comparison on a file of yours instead of
synthetic data, in any format ``SFTDataModule`` reads (``auto`` by default; ``--help`` lists
them): ours reads the file, TRL gets its rows as our format conversion gives them
(conversations split before the last assistant turn into prompt/completion; text rows as
``{"text": ...}``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TOKENIZER = ROOT / "assets" / "tiny-llama"
IGNORE_INDEX = -100

_WORDS = (
    "the a an of to and in is for on with as by at from that this it be are was or not "
    "which can will have has more most time data model people world water system process "
    "energy light plant animal city river market price policy health food school student "
    "teacher language story example answer question result method value number list word "
    "sentence paragraph summary reason cause effect change growth study research report "
    "history science computer program function table chart image color sound music game "
    "team player country government company product customer service quality design simple "
    "complex important different similar large small new old good better best quickly "
    "carefully clearly write describe explain compare classify generate create identify "
    "find give provide suggest rewrite translate summarize analyze evaluate convert list "
    "calculate determine predict edit improve correct choose select organize plan build "
    "because however therefore although while when where why how what who each every many "
    "few some several first second third finally also often usually always never perhaps "
    "photosynthesis climate economy technology internet network security privacy science "
    "mathematics algorithm variable equation triangle circle square ocean mountain forest "
    "weather season summer winter spring autumn morning evening family friend community"
)
WORDS = _WORDS.split()


# ------------------------------------------------------------------------------- data
def _text(rng: np.random.Generator, n_words: int) -> str:
    """``n_words`` random words as sentences of 6 to 18 words."""
    picks = rng.integers(0, len(WORDS), size=n_words)
    out, sentence = [], []
    target = int(rng.integers(6, 19))
    for i in picks:
        sentence.append(WORDS[i])
        if len(sentence) == target:
            out.append(" ".join(sentence).capitalize() + ".")
            sentence, target = [], int(rng.integers(6, 19))
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def _lognormal_words(rng: np.random.Generator, median: float, sigma: float, cap: int) -> int:
    return int(min(cap, max(1, round(rng.lognormal(np.log(median), sigma)))))


def make_conversations(n: int, seed: int) -> list[dict[str, Any]]:
    """Single-turn conversations with Alpaca-like lengths (in words).

    instruction ~ lognormal (median 15, mean ~17); an input on 40% (median 18, mean ~25);
    output ~ lognormal (median 40, mean ~57, 99th percentile ~290, capped at 400); a system
    prompt on 15%.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        instruction = _text(rng, _lognormal_words(rng, 15, 0.45, 120))
        user = instruction
        if rng.random() < 0.4:
            user += "\n\n" + _text(rng, _lognormal_words(rng, 18, 0.8, 250))
        output = _text(rng, _lognormal_words(rng, 40, 0.85, 400))
        messages = []
        if rng.random() < 0.15:
            messages.append({"role": "system", "content": _text(rng, int(rng.integers(5, 25)))})
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        rows.append({"messages": messages})
    return rows


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """TRL's conversational prompt/completion form of a single-turn conversation."""
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


def read_examples(path: Path, fmt: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The rows of a file of any SFT format as our canonical examples (as ``SFTDataModule``
    converts them), and how many rows of each format it holds."""
    from collections import Counter

    from src.datamodules.formats import detect_format, format_names, to_sft_example
    from src.datamodules.sources import Source

    examples, formats = [], Counter()
    for record in Source(path=str(path)).records(0):
        examples.append(to_sft_example(record, fmt))
        name = fmt
        if fmt == "auto":
            name = detect_format(record.row, record.where, format_names("chat", "text"))
        formats[name] += 1
    return examples, dict(formats)


def to_trl_row(example: dict[str, Any]) -> dict[str, Any] | None:
    """TRL's form of one of our examples: text as ``{"text": ...}``; a conversation as
    prompt/completion split before its last assistant turn (None without one: ours drops
    it too)."""
    if "text" in example:
        return {"text": example["text"]}
    messages = example["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    row = {"prompt": messages[:last], "completion": messages[last : last + 1]}
    if example.get("tools"):
        row["tools"] = example["tools"]
    return row


# --------------------------------------------------------------------------- metrics
def _flat(ds: Any, column: str) -> pa.Array:
    """The values of a list column of a ``datasets.Dataset``, flattened (no copy to Python)."""
    return pc.list_flatten(ds.data.table.column(column))


def trained_tokens(ds: Any) -> int:
    return int(pc.sum(pc.not_equal(_flat(ds, "labels"), IGNORE_INDEX)).as_py() or 0)


def real_tokens(ds: Any) -> int:
    return int(pc.sum(pc.list_value_length(ds.data.table.column("input_ids"))).as_py() or 0)


def naive_efficiency(lengths: list[int], batch_size: int) -> float:
    """Real tokens / padded tokens when unpacked examples are batched and padded to the longest."""
    padded = sum(
        len(lengths[i : i + batch_size]) * max(lengths[i : i + batch_size])
        for i in range(0, len(lengths), batch_size)
    )
    return sum(lengths) / padded


# ------------------------------------------------------------------------------ paths
def run_ours(
    jsonl: Path, max_length: int, packing: bool = True, fmt: str = "auto"
) -> tuple[float, Any]:
    from src.datamodules import SFTDataModule

    gc.collect()
    start = time.perf_counter()
    dm = SFTDataModule(
        tokenizer=str(TOKENIZER),
        train_files=str(jsonl),
        format=fmt,
        val_split=0,
        max_length=max_length,
        packing=packing,
        cache_dir=None,
        num_proc=1,
    )
    dm.setup("fit")
    return time.perf_counter() - start, dm


def make_trl_trainer(tmp: str, max_length: int, sample: list[dict[str, Any]]) -> tuple[Any, Any]:
    """An ``SFTTrainer`` (tiny random Llama, built from the committed config) and its args."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(TOKENIZER)))
    args = SFTConfig(
        output_dir=tmp,
        report_to=[],
        packing=True,
        packing_strategy="bfd",
        max_length=max_length,
        dataset_num_proc=None,
        use_cpu=True,
        per_device_train_batch_size=8,
    )
    # constructed on a handful of rows; the timed call below prepares the whole set
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(sample),
        processing_class=tokenizer,
    )
    return trainer, args


def run_trl(trainer: Any, args: Any, rows: list[dict[str, Any]]) -> tuple[float, float, Any]:
    """(time including ``Dataset.from_list``, time of ``_prepare_dataset`` alone, packed set)."""
    from datasets import Dataset

    gc.collect()
    start = time.perf_counter()
    dataset = Dataset.from_list(rows)
    mid = time.perf_counter()
    packed = trainer._prepare_dataset(
        dataset,
        trainer.processing_class,
        args,
        packing=True,
        formatting_func=None,
        dataset_name="train",
    )
    end = time.perf_counter()
    return end - start, end - mid, packed


def trl_single(trainer: Any, args: Any, row: dict[str, Any]) -> dict[str, list[int]]:
    """TRL's unpacked ``input_ids`` and ``labels`` of one row."""
    from datasets import Dataset

    ds = trainer._prepare_dataset(
        Dataset.from_list([row]),
        trainer.processing_class,
        args,
        packing=False,
        formatting_func=None,
        dataset_name="check",
    )
    return {"input_ids": ds[0]["input_ids"], "labels": ds[0]["labels"]}


# ------------------------------------------------------------------------------- main
def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # interleave with the [data] log lines
    from src.datamodules.formats import format_names

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="conversations")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--file",
        type=Path,
        default=None,
        help="run on this file instead of synthetic data (--n and --seed are then unused)",
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", *format_names("chat", "text")),  # what SFTDataModule reads
        help="the row format of --file",
    )
    opts = parser.parse_args()
    if opts.file is not None and not opts.file.exists():
        parser.error(f"--file {opts.file}: no such file or directory")

    import datasets
    import transformers

    datasets.disable_caching()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    import trl

    from src.datamodules.chat import tokenize_conversation
    from src.datamodules.turns import content_text

    tmp = tempfile.mkdtemp(prefix="bench-data-")
    multi_turn = 0
    if opts.file is None:
        jsonl = Path(tmp) / "train.jsonl"
        conversations = make_conversations(opts.n, opts.seed)
        with jsonl.open("w") as f:
            for row in conversations:
                f.write(json.dumps(row) + "\n")
        trl_rows = [to_prompt_completion(r) for r in conversations]
        described = f"{opts.n} conversations (seed {opts.seed})"
    else:
        jsonl = opts.file
        examples, formats = read_examples(jsonl, opts.format)
        paired = [(e, r) for e in examples if (r := to_trl_row(e)) is not None]
        if not paired:
            sys.exit(f"{jsonl}: no row with an assistant turn or a text to train on")
        if len({"text" in r for _, r in paired}) > 1:
            sys.exit(f"{jsonl}: text rows and conversations mixed; TRL takes one kind at a time")
        conversations = [e for e, _ in paired]
        trl_rows = [r for _, r in paired]
        multi_turn = sum(
            sum(m["role"] == "assistant" for m in e.get("messages", ())) > 1 for e in conversations
        )
        kinds = ", ".join(f"{n} {name}" for name, n in sorted(formats.items()))
        described = (
            f"{len(examples)} rows of {jsonl} ({kinds}; format {opts.format}), "
            f"{len(trl_rows)} with something to train on"
        )
    words = [
        len((r["text"] if "text" in r else content_text(r["completion"][-1])).split())
        for r in trl_rows
    ]
    size = sum(p.stat().st_size for p in ([jsonl] if jsonl.is_file() else jsonl.rglob("*")))
    print(
        f"{described}, {'text' if 'text' in conversations[0] else 'assistant'} words: median "
        f"{statistics.median(words):.0f}, mean {statistics.mean(words):.1f}, max {max(words)}; "
        f"{size / 1e6:.1f} MB of {'JSONL' if opts.file is None else 'input'}; "
        f"max_length {opts.max_length}; "
        f"transformers {transformers.__version__}, datasets {datasets.__version__}, "
        f"trl {trl.__version__}; {os.cpu_count()} CPUs"
    )
    if multi_turn:
        print(
            f"note: {multi_turn} conversations have more than one assistant turn; ours trains "
            "every assistant turn, TRL's prompt/completion form only the last, so the trained "
            "tokens differ by more than the newline explained below"
        )

    trainer, args = make_trl_trainer(tmp, opts.max_length, trl_rows[:8])

    ours_times, trl_times, trl_prep_times = [], [], []
    dm = packed = None
    for r in range(opts.repeats):
        dm = packed = None
        t, dm = run_ours(jsonl, opts.max_length, fmt=opts.format)
        ours_times.append(t)
        t_all, t_prep, packed = run_trl(trainer, args, trl_rows)
        trl_times.append(t_all)
        trl_prep_times.append(t_prep)
        print(
            f"repeat {r + 1}/{opts.repeats}: ours {ours_times[-1]:.2f}s, "
            f"TRL {t_all:.2f}s (_prepare_dataset alone {t_prep:.2f}s)"
        )
    assert dm is not None and packed is not None

    # ---------------------------------------------------------------- what was produced
    ours_ds, stats = dm.datasets["train"], dm.stats["train"]
    ours_rows = len(ours_ds)
    ours_real = real_tokens(ours_ds)
    ours_eff = ours_real / (ours_rows * opts.max_length)
    assert stats.packing_efficiency is not None
    assert abs(stats.packing_efficiency - ours_eff) < 1e-9, (stats.packing_efficiency, ours_eff)
    ours_trained = trained_tokens(ours_ds)

    trl_rows_n = len(packed)
    trl_real = real_tokens(packed)
    trl_eff = trl_real / (trl_rows_n * opts.max_length)
    trl_trained = trained_tokens(packed)

    ours_lengths = sorted(pc.list_flatten(ours_ds.data.table.column("seq_lengths")).to_pylist())
    trl_lengths = sorted(pc.list_flatten(packed.data.table.column("seq_lengths")).to_pylist())
    same_lengths = ours_lengths == trl_lengths

    # ------------------------------------------------- first example, token by token
    first = conversations[0]
    if "text" in first:
        ours_first = dm.encoder.encode([first], ["first example"])[0]
    else:
        ours_first = tokenize_conversation(
            dm.tokenizer, first["messages"], tools=first.get("tools")
        )
    trl_first = trl_single(trainer, args, trl_rows[0])
    ids_agree = ours_first.input_ids == trl_first["input_ids"]
    ours_mask = [label != IGNORE_INDEX for label in ours_first.labels]
    trl_mask = [label != IGNORE_INDEX for label in trl_first["labels"]]
    extra = [
        dm.tokenizer.convert_ids_to_tokens(tok)
        for tok, a, b in zip(ours_first.input_ids, ours_mask, trl_mask, strict=False)
        if b and not a
    ]
    missing = [
        dm.tokenizer.convert_ids_to_tokens(tok)
        for tok, a, b in zip(ours_first.input_ids, ours_mask, trl_mask, strict=False)
        if a and not b
    ]

    # ------------------------------------------------------------ naive padding
    lengths_in_order = [len(x) for x in _unpacked_ids(dm, conversations)]
    naive = naive_efficiency(lengths_in_order, 8)
    naive_sorted = naive_efficiency(sorted(lengths_in_order), 8)

    # ----------------------------------------------------------------------- report
    n_examples = stats.examples
    ours_best, trl_best, trl_prep_best = min(ours_times), min(trl_times), min(trl_prep_times)
    ours_eps = n_examples / ours_best
    trl_eps = len(trl_rows) / trl_best
    trl_prep_eps = len(trl_rows) / trl_prep_best
    ratio = ours_eps / trl_eps
    median_ratio = (
        statistics.median(trl_times) / statistics.median(ours_times) * len(trl_rows) / n_examples
    )

    print()
    print(
        f"best of {opts.repeats} repeats; {n_examples} examples -> packed rows: ours "
        f"{ours_rows}, TRL {trl_rows_n}; real tokens: ours {ours_real}, TRL {trl_real}; "
        f"truncated (>{opts.max_length} tokens): {stats.truncated}"
    )
    print()
    print("| path | examples/s | padding efficiency | trained tokens |")
    print("|---|---:|---:|---:|")
    print(
        f"| ours: SFTDataModule.setup (BFD packing) | {ours_eps:,.0f} | {ours_eff:.4f} "
        f"| {ours_trained:,} |"
    )
    print(
        f"| TRL: Dataset.from_list + _prepare_dataset (bfd) | {trl_eps:,.0f} | {trl_eff:.4f} "
        f"| {trl_trained:,} |"
    )
    print(
        f"| TRL: _prepare_dataset alone | {trl_prep_eps:,.0f} | {trl_eff:.4f} | {trl_trained:,} |"
    )
    print(f"| naive: unpacked, batches of 8 in order | - | {naive:.4f} | (as ours) |")
    print(
        f"| naive: unpacked, batches of 8 sorted by length | - | {naive_sorted:.4f} | (as ours) |"
    )
    print()
    print(
        f"ratio ours/TRL examples/s: {ratio:.2f}x (vs _prepare_dataset alone: "
        f"{ours_eps / trl_prep_eps:.2f}x); target >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'}"
    )
    print(
        f"our padding efficiency {ours_eff:.4f}; target >= 0.98: "
        f"{'met' if ours_eff >= 0.98 else 'MISSED'}"
    )
    print()
    print(
        f"first example: token ids ours == TRL: {ids_agree} ({len(ours_first.input_ids)} vs "
        f"{len(trl_first['input_ids'])} tokens)"
    )
    print(
        f"first example: trained tokens ours {sum(ours_mask)}, TRL {sum(trl_mask)}; "
        f"trained by TRL only: {extra}; by ours only: {missing}"
    )
    print(f"all examples: same multiset of sequence lengths in both packed sets: {same_lengths}")
    diff = trl_trained - ours_trained
    whole = n_examples - stats.truncated  # truncation cuts that newline in both paths
    if "text" in first:  # no chat template: both train every token of a text row
        print(
            f"trained tokens TRL - ours = {diff:,} (text rows, every token trained in both: "
            f"{'equal' if diff == 0 else 'NOT equal'})"
        )
    else:
        print(
            f"trained tokens TRL - ours = {diff:,} (untruncated examples: {whole:,}; "
            f"{'equal' if diff == whole else 'NOT equal'}): TRL's completion mask covers "
            "everything after the generation prompt, including the newline the ChatML template "
            "writes after <|im_end|>; ours ends the assistant span at <|im_end|> (trailing white "
            "space excluded), so TRL trains on one more token per example: a newline after the "
            "end-of-turn token"
        )
    print(
        f"seconds per repeat (median): ours {statistics.median(ours_times):.2f}, TRL "
        f"{statistics.median(trl_times):.2f}; median ratio {median_ratio:.2f}x"
    )

    results = {
        "n": opts.n if opts.file is None else len(trl_rows),
        "file": None if opts.file is None else str(opts.file),
        "format": opts.format,
        "multi_turn_conversations": multi_turn,
        "max_length": opts.max_length,
        "repeats": opts.repeats,
        "seed": opts.seed if opts.file is None else None,
        "cpus": os.cpu_count(),
        "versions": {
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "trl": trl.__version__,
        },
        "examples": n_examples,
        "ours": {
            "seconds": ours_times,
            "examples_per_s": ours_eps,
            "packed_rows": ours_rows,
            "real_tokens": ours_real,
            "padding_efficiency": ours_eff,
            "trained_tokens": ours_trained,
            "truncated": stats.truncated,
        },
        "trl": {
            "seconds": trl_times,
            "prepare_dataset_seconds": trl_prep_times,
            "examples_per_s": trl_eps,
            "prepare_dataset_examples_per_s": trl_prep_eps,
            "packed_rows": trl_rows_n,
            "real_tokens": trl_real,
            "padding_efficiency": trl_eff,
            "trained_tokens": trl_trained,
        },
        "naive_padding_efficiency": {"in_order_batch_8": naive, "sorted_batch_8": naive_sorted},
        "ratio_examples_per_s": ratio,
        "ratio_examples_per_s_median": (
            statistics.median(trl_times)
            / statistics.median(ours_times)
            * len(trl_rows)
            / n_examples
        ),
        "first_example_ids_agree": ids_agree,
        "same_sequence_lengths": same_lengths,
        "targets_met": {"ratio_1_5": ratio >= 1.5, "efficiency_0_98": ours_eff >= 0.98},
    }
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {opts.json}")


def _unpacked_ids(dm: Any, conversations: list[dict[str, Any]]) -> list[list[int]]:
    """Our unpacked token ids of every conversation, in order (truncated to max_length)."""
    out = []
    for i in range(0, len(conversations), 1000):
        chunk = conversations[i : i + 1000]
        for tok in dm.encoder.encode(chunk, [str(i + j) for j in range(len(chunk))]):
            out.append(tok.input_ids[: dm.max_length])
    return out


if __name__ == "__main__":
    main()
