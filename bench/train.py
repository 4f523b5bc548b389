"""SFT training throughput: our Lightning fit against TRL's ``SFTTrainer`` and a bare loop.

All paths train the same tiny Llama (built from a config, same seed, float32, sdpa
attention, CPU) with the same ``torch.optim.AdamW`` (lr 1e-3, no weight decay, constant
schedule, no clipping), batch size and number of optimizer steps, on the demo conversations
(``data/demo/sft_train.jsonl``, OpenAI ``messages``) with the committed tokenizer, packed by
best-fit-decreasing into rows of ``--max-length`` and trained on every assistant turn:

* ours: a Lightning ``Trainer`` fit of ``SFTModule`` + ``SFTDataModule(packing=True)`` with
  logger, checkpoints, progress bar, model summary and validation off;
* TRL: ``SFTTrainer`` with ``SFTConfig(packing=True, packing_strategy="bfd",
  assistant_only_loss=True)`` on the same ``messages`` rows. Its chat template is the
  tokenizer's own with ``{% generation %}`` markers around each assistant reply and its
  ``<|im_end|>`` (the text rendered is identical; TRL needs the markers to mask);
* bare: a plain PyTorch loop over our data module's loader: forward, the same loss
  function (``src.modules.losses.token_cross_entropy``: cross-entropy on the label tokens
  only), backward, ``optimizer.step()``, ``zero_grad()``, nothing else.

TRL's best-fit-decreasing packing always trains padding-free: the rows of a batch are
concatenated into one row (on a CPU with sdpa, attention then spans the whole batch under a
block-diagonal mask). The row "ours, padding_free" runs our module with
``SFTDataModule(padding_free=True)``, the same batch layout, to tell the layout apart from the
framework.

The first ``--warmup`` optimizer steps are not timed; a path's rate is its real (non-pad)
tokens of the timed steps over the time from the end of the last warmup step to the end of
the last step (so each timed step's data loading is counted once), by wall clock and by the
process's CPU time. The paths run one after the other in each repeat, in rotating order;
ratios are per repeat, reported as median (min to max). torch runs one thread by default
(``--threads``): steadiest on a machine shared with other jobs.

Run from the repository root: ``python bench/train.py [--max-length 1024] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    IGNORE_INDEX,
    ROOT,
    StepLog,
    adamw,
    build_model,
    json_options,
    model_dir,
    n_params,
    quiet,
    rate_table,
    run_lightning_fit,
    run_repeats,
    set_threads,
    spread,
    verdict,
    versions,
    weights_checksum,
)

DATA = ROOT / "data" / "demo" / "sft_train.jsonl"

# The tokenizer's ChatML template, rendering the same text, with TRL's assistant markers.
MARKED_CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def batch_counts(batch: dict[str, Any]) -> tuple[int, int, int]:
    """(real tokens, trained label tokens after the shift, token positions) of our batch."""
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return int(batch["real_tokens"]), trained, batch["input_ids"].numel()


# -------------------------------------------------------------------------------- ours
def sft_data(opts: argparse.Namespace, padding_free: bool = False, prepared: Any = None) -> Any:
    from src.datamodules import SFTDataModule

    dm = SFTDataModule(
        tokenizer=str(opts.model_path),
        train_files=str(DATA),
        val_split=0,
        format="messages",
        max_length=opts.max_length,
        batch_size=opts.batch_size,
        packing=True,
        padding_free=padding_free,
        cache_dir=None,
    )
    if prepared is not None:  # the same prepared rows; only the collator differs
        dm.datasets, dm.stats = prepared.datasets, prepared.stats
    else:
        dm.setup("fit")
    return dm


def run_ours(opts: argparse.Namespace, dm: Any) -> tuple[StepLog, float]:
    import torch

    from src.modules import SFTModule

    module = SFTModule(
        model_name_or_path=str(opts.model_path),
        from_scratch=True,
        tokenizer=str(opts.model_path),
        max_length=opts.max_length,
        torch_dtype="float32",
        attn_implementation="sdpa",
        optimizer=adamw(opts.lr),
        scheduler="constant",
        warmup=0,
    )
    torch.manual_seed(opts.seed)
    module.configure_model()  # built before fit (which then keeps it) to read its weights
    checksum = weights_checksum(module.model)
    log = StepLog()
    run_lightning_fit(module, {"datamodule": dm}, opts.steps, log, batch_counts, opts.seed + 1)
    return log, checksum


# -------------------------------------------------------------------------------- bare
def run_bare(opts: argparse.Namespace, dm: Any) -> tuple[StepLog, float]:
    """Forward, loss, backward and step over our loader's batches; nothing else. The loss is
    our pure function (cross-entropy on the label tokens alone), the same math as ours."""
    import torch

    from src.modules.losses import token_cross_entropy

    model = build_model(opts.model_path, opts.seed)
    checksum = weights_checksum(model)
    optimizer = adamw(opts.lr)(model.parameters())
    torch.manual_seed(opts.seed + 1)
    log = StepLog()
    for batch in dm.train_dataloader():
        inputs = {
            k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch
        }
        logits = model(**inputs, use_cache=False).logits
        loss_sum, count, _ = token_cross_entropy(logits, batch["labels"])
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.step(*batch_counts(batch))
        if len(log.ends) == opts.steps:
            break
    return log, checksum


# --------------------------------------------------------------------------------- TRL
def trl_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = MARKED_CHATML
    return tokenizer


def trl_config(opts: argparse.Namespace, **extra: Any) -> Any:
    from trl import SFTConfig

    extra.setdefault("assistant_only_loss", True)
    return SFTConfig(
        output_dir=str(opts.tmp / "trl"),
        report_to=[],
        packing=True,
        packing_strategy="bfd",
        max_length=opts.max_length,
        per_device_train_batch_size=opts.batch_size,
        max_steps=opts.steps,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is True; ours and the bare loop have none
        optim="adamw_torch",
        learning_rate=opts.lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,  # no clipping, as in the other paths
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=opts.seed,
        **extra,
    )


def trl_prepare(opts: argparse.Namespace, tokenizer: Any) -> Any:
    """TRL's packed training set (prepared once; each timed trainer skips preparation)."""
    from datasets import Dataset
    from trl import SFTTrainer

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    trainer = SFTTrainer(
        model=build_model(opts.model_path, opts.seed),
        args=trl_config(opts),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    return trainer.train_dataset, trainer


class CountingCollator:
    """TRL's collator, recording what each batch holds (in the order the loader asks)."""

    def __init__(self, inner: Any, log: StepLog) -> None:
        self.inner, self.log = inner, log

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        real = sum(len(e["input_ids"]) for e in examples)
        trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.log.units.append(real)
        self.log.trained.append(trained)
        self.log.slots.append(batch["input_ids"].numel())
        return batch


def run_trl(opts: argparse.Namespace, prepared: Any, tokenizer: Any) -> tuple[StepLog, float]:
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTTrainer

    log = StepLog()

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            log.end()

    model = build_model(opts.model_path, opts.seed)
    checksum = weights_checksum(model)
    trainer = SFTTrainer(
        model=model,
        # prepared already: no preparation, and no assistant mask to check again
        args=trl_config(
            opts, dataset_kwargs={"skip_prepare_dataset": True}, assistant_only_loss=False
        ),
        train_dataset=prepared,
        processing_class=tokenizer,
        callbacks=[StepEnd()],
    )
    trainer.data_collator = CountingCollator(trainer.data_collator, log)
    trainer.remove_callback(PrinterCallback)  # the final metrics line
    trainer.train()
    # the loader may collate a batch ahead of the step that trains it; order is kept
    n = len(log.ends)
    log.units, log.trained, log.slots = log.units[:n], log.trained[:n], log.slots[:n]
    return log, checksum


# ------------------------------------------------------------------------------ checks
def first_example_check(opts: argparse.Namespace, dm: Any, trainer: Any) -> str:
    """Our tokens and label mask of the first conversation against TRL's (unpacked)."""
    from datasets import Dataset

    from src.datamodules.chat import tokenize_conversation

    row = json.loads(DATA.read_text().splitlines()[0])
    ours = tokenize_conversation(dm.tokenizer, row["messages"])
    theirs = trainer._prepare_dataset(
        Dataset.from_list([row]),
        trainer.processing_class,
        trainer.args,
        packing=False,
        formatting_func=None,
        dataset_name="check",
    )[0]
    ours_mask = [x != IGNORE_INDEX for x in ours.labels]
    trl_mask = [x != IGNORE_INDEX for x in theirs["labels"]]
    return (
        f"first conversation: token ids ours == TRL: {ours.input_ids == theirs['input_ids']}; "
        f"trained positions ours == TRL: {ours_mask == trl_mask} "
        f"({sum(ours_mask)} of {len(ours_mask)} tokens)"
    )


def profile_steps(opts: argparse.Namespace, dm: Any, path: str, top: int) -> None:
    """cProfile of one short fit of ``path`` (ours or bare), by total time per function."""
    import cProfile
    import pstats

    runner = run_ours if path == "ours" else run_bare
    profiler = cProfile.Profile()
    profiler.enable()
    runner(opts, dm)
    profiler.disable()
    print(f"\ncProfile of {path}: {opts.steps} steps, top {top} by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


# -------------------------------------------------------------------------------- main
def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=1024, help="packed row length")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per optimizer step")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each path")
    parser.add_argument("--model", choices=["tiny", "medium"], default="tiny")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steadiest on a shared machine; 0: torch's default)",
    )
    parser.add_argument(
        "--no-padding-free-row",
        action="store_true",
        help="leave out ours with padding_free=True (TRL's batch layout: one row per batch)",
    )
    parser.add_argument(
        "--profile",
        choices=["ours", "bare", "both"],
        default=None,
        help="after the benchmark, cProfile a run of ours and/or the bare loop",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    opts = parser.parse_args()
    if not 1 <= opts.warmup < opts.steps:
        parser.error("need 1 <= --warmup < --steps")

    quiet()
    set_threads(opts.threads)
    import torch

    opts.tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    atexit.register(shutil.rmtree, opts.tmp, True)  # model config, tokenizer copy, TRL dir
    opts.model_path = model_dir(opts.tmp, opts.model, opts.max_length)

    dm = sft_data(opts)
    stats = dm.stats["train"]
    rows = len(dm.datasets["train"])
    if rows < opts.batch_size * opts.steps:
        print(f"note: {rows} packed rows < {opts.batch_size * opts.steps}: a second epoch starts")
    tokenizer = trl_tokenizer(opts.model_path)
    trl_data, trl_trainer = trl_prepare(opts, tokenizer)
    trl_rows = len(trl_data)
    trl_real = sum(len(x) for x in trl_data["input_ids"])
    trl_trained = sum(sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in trl_data["labels"])
    model = build_model(opts.model_path, opts.seed)
    v = versions()
    print(
        f"model: Llama from {opts.model} config, {n_params(model) / 1e6:.2f}M parameters, "
        f"float32, sdpa; {torch.get_num_threads()} torch threads; {os.cpu_count()} CPUs; "
        + ", ".join(f"{k} {x}" for k, x in v.items())
    )
    print(
        f"data: {DATA.relative_to(ROOT)}: {stats.examples} conversations, {stats.tokens} tokens "
        f"({stats.trained_tokens} trained); rows of {opts.max_length}, batch {opts.batch_size}, "
        f"{opts.steps} steps ({opts.warmup} untimed), {opts.repeats} repeats"
    )
    print(
        f"packing: ours {rows} rows ({stats.tokens / rows:.1f} real tokens per row); TRL "
        f"{trl_rows} rows ({trl_real / trl_rows:.1f} per row), {trl_real} tokens "
        f"({trl_trained} trained)"
    )
    print(first_example_check(opts, dm, trl_trainer))
    del trl_trainer, model

    runners = {
        "ours": lambda: run_ours(opts, dm),
        "TRL": lambda: run_trl(opts, trl_data, tokenizer),
        "bare": lambda: run_bare(opts, dm),
    }
    if not opts.no_padding_free_row:
        dm_free = sft_data(opts, padding_free=True, prepared=dm)
        runners["ours, padding_free"] = lambda: run_ours(opts, dm_free)
    names = list(runners)

    measured = run_repeats(runners, opts.repeats, opts.warmup, "tok")
    logs = measured.logs

    # ------------------------------------------------------------------------ report
    timed = slice(opts.warmup, opts.steps)
    print()
    print(f"per step (first repeat, timed steps {opts.warmup + 1}..{opts.steps}):")
    for name in names:
        log = logs[name]
        print(
            f"  {name}: real tokens {log.units[timed]}, trained tokens {log.trained[timed]}, "
            f"token positions {log.slots[timed]}"
        )
    same = logs["ours"].units == logs["bare"].units and logs["ours"].trained == logs["bare"].trained
    print(f"  ours and bare trained on the same batches: {same}")
    start_same = len({round(c, 3) for c in measured.checksums.values()}) == 1
    print(f"  every path started from the same weights (checksum): {start_same}")

    labels = {
        "ours": "ours: Lightning fit, SFTModule + SFTDataModule(packing)",
        "ours, padding_free": "ours, padding_free=True (TRL's batch layout)",
        "TRL": f"TRL {v['trl']} SFTTrainer (bfd packing, padding-free)",
        "bare": "bare PyTorch loop over our batches",
    }
    print()
    rate_table(measured, {k: labels[k] for k in names}, "real tokens", "TRL")

    figures: dict[str, Any] = {}
    for clock, rep in (("wall", measured.wall), ("cpu", measured.cpu)):
        figures[clock] = {
            "rates": rep.rates,
            "ratio_ours_trl": rep.ratios("ours", "TRL"),
            "overhead_vs_bare": [1 / x - 1 for x in rep.ratios("ours", "bare")],
        }
        if "ours, padding_free" in names:
            figures[clock]["ratio_padding_free_trl"] = rep.ratios("ours, padding_free", "TRL")
    wall, cpu = figures["wall"], figures["cpu"]
    ratio_ok = statistics.median(wall["ratio_ours_trl"]) >= 1.0
    overhead_ok = statistics.median(wall["overhead_vs_bare"]) <= 0.05
    print()
    print(
        f"ours/TRL real tokens/s: {spread(wall['ratio_ours_trl'])}x "
        f"(by CPU time {spread(cpu['ratio_ours_trl'])}x); target >= 1.0: {verdict(ratio_ok)}"
    )
    if "ours, padding_free" in names:
        print(
            f"ours with padding_free=True / TRL (the same batch layout): "
            f"{spread(wall['ratio_padding_free_trl'])}x "
            f"(by CPU time {spread(cpu['ratio_padding_free_trl'])}x)"
        )
    pct = {k: [100 * x for x in figures[k]["overhead_vs_bare"]] for k in figures}
    by_step = [100 * (1 / x - 1) for x in measured.step.ratios("ours", "bare")]
    figures["step"] = {"rates": measured.step.rates, "overhead_vs_bare_pct": by_step}
    print(
        f"our overhead over the bare loop (bare/ours - 1): {spread(pct['wall'])} % "
        f"(by CPU time {spread(pct['cpu'])} %; by median step rate {spread(by_step)} %); "
        f"target <= 5 %: {verdict(overhead_ok)}"
    )

    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(
            json.dumps(
                {
                    "options": json_options(opts),
                    "versions": v,
                    **figures,
                    "same_batches_ours_bare": same,
                    "same_initial_weights": start_same,
                    "targets_met": {"ratio_1_0": ratio_ok, "overhead_5pct": overhead_ok},
                },
                indent=2,
            )
            + "\n"
        )
        print(f"results written to {opts.json}")

    if opts.profile:
        for path in ("ours", "bare") if opts.profile == "both" else (opts.profile,):
            profile_steps(opts, dm, path, 25)


if __name__ == "__main__":
    main()
