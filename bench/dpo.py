"""DPO with a LoRA policy: our Lightning fit against TRL's ``DPOTrainer``, and its memory.

Throughput: both train the same Llama (built from a config, same seed, float32, sdpa, CPU)
with the same LoRA adapters (r 16, alpha 32, no dropout, every linear layer but the
output), the sigmoid loss (beta 0.1) with the reference = the policy with its adapters
disabled, the same ``torch.optim.AdamW`` (lr 5e-4, no weight decay, constant, no clipping),
batch size and number of optimizer steps, on ``data/demo/preference_train.jsonl`` (prompt,
chosen and rejected as ``messages``) with the committed tokenizer:

* ours: a Lightning ``Trainer`` fit of ``DPOModule(lora=LoraSettings(...))`` +
  ``PreferenceDataModule`` with logger, checkpoints, progress bar, summary and validation off;
* TRL: ``DPOTrainer`` with ``peft_config=LoraConfig(...)`` (no ``ref_model``).

The first ``--warmup`` steps are not timed; a path's rate is its pairs of the timed steps
over the time from the end of the last warmup step to the end of the last step. Paths run in
rotating order within each repeat; ratios are per repeat, as median (min to max), by wall
clock and by the process's CPU time; torch runs one thread by default (``--threads``).

Memory: our DPO's peak against our SFT's with the same LoRA model (``--memory-model``,
default ``medium``: 512 wide, 8 layers, ~32M parameters, so that the weights dominate the
noise of a process's resident memory) on the same batches (SFT trains on the chosen and the
rejected rows of each pair, the very tensors DPO's policy forward sees). torch's CPU
allocations are invisible to ``tracemalloc``, so each measurement runs in a fresh process
(glibc returning large blocks to the system at once: ``MALLOC_MMAP_THRESHOLD_``) and reads its
resident set: the baseline before the model is built, after it is built, and the peak
(``VmHWM``, reset after the model is built) over ``--memory-steps`` optimizer steps.

Run from the repository root: ``python bench/dpo.py [--batch-size 16] [--repeats 8]``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
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
    reset_peak,
    run_lightning_fit,
    run_repeats,
    set_threads,
    spread,
    status_kib,
    verdict,
    versions,
    weights_checksum,
)

DATA = ROOT / "data" / "demo" / "preference_train.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
BETA = 0.1


def pair_counts(batch: dict[str, Any]) -> tuple[int, int, int]:
    """(pairs, trained label tokens after the shift, token positions) of our DPO batch."""
    trained = sum(
        int((batch[f"{side}_labels"][:, 1:] != IGNORE_INDEX).sum())
        for side in ("chosen", "rejected")
    )
    return batch["chosen_input_ids"].shape[0], trained, 2 * batch["chosen_input_ids"].numel()


def preference_data(opts: argparse.Namespace) -> Any:
    from src.datamodules import PreferenceDataModule

    dm = PreferenceDataModule(
        tokenizer=str(opts.model_path),
        train_files=str(DATA),
        val_split=0,
        max_length=opts.max_length,
        batch_size=opts.batch_size,
        cache_dir=None,
    )
    dm.setup("fit")
    return dm


def our_module(opts: argparse.Namespace, objective: str) -> Any:
    from src.modules import DPOModule, LoraSettings, SFTModule

    common = {
        "model_name_or_path": str(opts.model_path),
        "from_scratch": True,
        "tokenizer": str(opts.model_path),
        "max_length": opts.max_length,
        "torch_dtype": "float32",
        "attn_implementation": "sdpa",
        "optimizer": adamw(opts.lr),
        "scheduler": "constant",
        "warmup": 0,
        "lora": LoraSettings(**LORA),
    }
    if objective == "dpo":
        return DPOModule(loss_type="sigmoid", beta=BETA, **common)
    return SFTModule(**common)


def run_ours(opts: argparse.Namespace, dm: Any) -> tuple[StepLog, float]:
    import torch

    module = our_module(opts, "dpo")
    torch.manual_seed(opts.seed)
    module.configure_model()  # built before fit (which then keeps it) to read its weights
    checksum = weights_checksum(module.model)
    log = StepLog()
    run_lightning_fit(module, {"datamodule": dm}, opts.steps, log, pair_counts, opts.seed + 1)
    reference = module.reference
    opts.facts["ours: a reference copy"] = reference is not None and reference.model is not None
    return log, checksum


# --------------------------------------------------------------------------------- TRL
def trl_config(opts: argparse.Namespace) -> Any:
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(opts.tmp / "trl"),
        report_to=[],
        loss_type=["sigmoid"],
        beta=BETA,
        max_length=opts.max_length,
        per_device_train_batch_size=opts.batch_size,
        max_steps=opts.steps,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is True; ours has none
        optim="adamw_torch",
        learning_rate=opts.lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=opts.seed,
    )


def trl_lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )


def trl_trainer(opts: argparse.Namespace, rows: Any, callbacks: list | None = None) -> Any:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    model = build_model(opts.model_path, opts.seed)
    trainer = DPOTrainer(
        model=model,
        args=trl_config(opts),
        train_dataset=rows if not isinstance(rows, list) else Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(str(opts.model_path)),
        peft_config=trl_lora(),
        callbacks=callbacks,
    )
    return trainer


class CountingCollator:
    """TRL's collator, recording what each batch holds (in the order the loader asks)."""

    def __init__(self, inner: Any, log: StepLog) -> None:
        self.inner, self.log = inner, log

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        self.log.units.append(len(examples))
        self.log.trained.append(int(batch["completion_mask"][:, 1:].sum()))
        self.log.slots.append(batch["input_ids"].numel())
        return batch


def run_trl(opts: argparse.Namespace, prepared: Any, sample: list) -> tuple[StepLog, float]:
    from transformers import PrinterCallback, TrainerCallback

    log = StepLog()

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            log.end()

    trainer = trl_trainer(opts, sample, [StepEnd()])  # prepares a few rows only
    trainer.train_dataset = prepared  # the whole set, prepared once
    checksum = weights_checksum(trainer.model)
    trainer.data_collator = CountingCollator(trainer.data_collator, log)
    trainer.remove_callback(PrinterCallback)  # the final metrics line
    trainer.train()
    opts.facts["TRL: a reference model"] = trainer.ref_model is not None
    n = len(log.ends)
    log.units, log.trained, log.slots = log.units[:n], log.trained[:n], log.slots[:n]
    return log, checksum


def pair_token_check(dm: Any, prepared: Any) -> str:
    """Our chosen/rejected token ids of every pair against TRL's (same file order)."""
    newline = dm.tokenizer.convert_tokens_to_ids("\u010a")  # the template's "\n"
    ours, theirs = dm.datasets["train"], prepared
    same = plus_newline = 0
    for a, b in zip(ours, theirs, strict=True):
        for side in ("chosen", "rejected"):
            mine, trl = a[f"{side}_input_ids"], b["prompt_ids"] + b[f"{side}_ids"]
            same += mine == trl
            plus_newline += mine + [newline] == trl
    n = 2 * len(ours)
    return (
        f"token ids of the {n} sequences: equal in {same}; TRL's = ours + the newline the "
        f"template writes after <|im_end|> in {plus_newline} (TRL's response is the rest of "
        "the rendering; ours stops at <|im_end|>, so TRL trains one more token per response)"
    )


# ------------------------------------------------------------------------------ memory
class SFTOnPairs:
    """Our preference batch as an SFT batch: the chosen then the rejected rows."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.collate(rows)
        out = {
            key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
            for key in ("input_ids", "attention_mask", "labels")
        }
        out["real_tokens"] = batch["real_tokens"]
        out["token_slots"] = batch["token_slots"]
        return out


def PairsAsSFT(dm: Any) -> Any:  # noqa: N802  (a class, built on first use)
    """A data module whose loader is our preference loader (same rows, batch size, shuffle)
    yielding SFT batches of the chosen and rejected rows."""
    import lightning.pytorch as pl
    from torchdata.stateful_dataloader import StatefulDataLoader

    class _PairsAsSFT(pl.LightningDataModule):
        def train_dataloader(self) -> StatefulDataLoader:
            return StatefulDataLoader(
                dm.datasets["train"],
                batch_size=dm.batch_size,
                shuffle=True,
                collate_fn=SFTOnPairs(dm.collator()),
            )

    return _PairsAsSFT()


def memory_child(opts: argparse.Namespace) -> None:
    """One measurement (``--child sft|dpo``): prints a JSON line of resident-set figures."""
    import torch

    dm = preference_data(opts)
    module = our_module(opts, opts.child)
    if opts.child == "dpo":
        fit_kwargs: dict[str, Any] = {"datamodule": dm}
        count = pair_counts
    else:
        fit_kwargs = {"datamodule": PairsAsSFT(dm)}

        def count(batch: dict[str, Any]) -> tuple[int, int, int]:
            trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            return batch["input_ids"].shape[0] // 2, trained, batch["input_ids"].numel()

    before = status_kib("VmRSS")
    torch.manual_seed(opts.seed)
    module.configure_model()
    built = status_kib("VmRSS")
    reset = reset_peak()
    log = StepLog()  # the same shuffle seed in both children: the same batches
    run_lightning_fit(module, fit_kwargs, opts.steps, log, count, opts.seed + 1)
    peak = status_kib("VmHWM")
    total = n_params(module.model)
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    print(
        "MEMORY "
        + json.dumps(
            {
                "objective": opts.child,
                "before_model_mib": before / 1024,
                "after_model_mib": built / 1024,
                "peak_mib": peak / 1024,
                "peak_reset": reset,
                "params": total,
                "trainable": trainable,
                "trained_tokens": log.trained,
                "token_positions": log.slots,
            }
        )
    )


def measure_memory(opts: argparse.Namespace, objective: str) -> dict[str, Any]:
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        objective,
        "--model",
        opts.memory_model,
        "--batch-size",
        str(opts.memory_batch_size),
        "--steps",
        str(opts.memory_steps),
        "--max-length",
        str(opts.max_length),
        "--threads",
        str(opts.threads),
        "--seed",
        str(opts.seed),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in out.stdout.splitlines() if x.startswith("MEMORY ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"memory measurement of {objective} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("MEMORY ") :])


# -------------------------------------------------------------------------------- main
def memory_report(opts: argparse.Namespace) -> dict[str, Any]:
    """Our SFT and DPO peaks, each in fresh processes (interleaved, ``--memory-repeats``)."""
    runs: dict[str, list[dict[str, Any]]] = {"sft": [], "dpo": []}
    for _ in range(opts.memory_repeats):
        for key in runs:
            runs[key].append(measure_memory(opts, key))

    def mib(m: dict[str, Any]) -> dict[str, float]:
        return {
            "model": m["after_model_mib"] - m["before_model_mib"],
            "peak": m["peak_mib"] - m["before_model_mib"],
            "growth": m["peak_mib"] - m["after_model_mib"],
        }

    figures = {k: [mib(m) for m in v] for k, v in runs.items()}
    med = {
        k: {f: statistics.median(x[f] for x in v) for f in ("model", "peak", "growth")}
        for k, v in figures.items()
    }
    sft, dpo = runs["sft"][0], runs["dpo"][0]
    same = all(m["trained_tokens"] == sft["trained_tokens"] for v in runs.values() for m in v)
    reset = all(m["peak_reset"] for v in runs.values() for m in v)
    print()
    print(
        f"memory: our SFT and our DPO with the same LoRA model, each in a fresh process "
        f"({opts.memory_repeats} of each, interleaved); {opts.memory_model} model "
        f"({dpo['params'] / 1e6:.1f}M parameters, {dpo['trainable'] / 1e6:.2f}M LoRA), batch "
        f"{opts.memory_batch_size} pairs (SFT: their {2 * opts.memory_batch_size} rows), "
        f"{opts.memory_steps} steps; same batches: {same}; peak reset after the model build: "
        f"{reset}"
    )
    print()
    print(
        "| our run | model built (MiB) | peak over the pre-model baseline (MiB) "
        "| peak over the built model (MiB) |"
    )
    print("|---|---:|---:|---:|")
    for key, label in (("sft", "SFT, LoRA"), ("dpo", "DPO sigmoid, LoRA, reference = no adapters")):
        m = med[key]
        print(f"| {label} | {m['model']:,.0f} | {m['peak']:,.0f} | {m['growth']:,.0f} |")
    total = med["dpo"]["peak"] / med["sft"]["peak"]
    growth = med["dpo"]["growth"] / max(med["sft"]["growth"], 1e-9)
    copy = med["dpo"]["model"]
    print()
    print(
        f"DPO/SFT peak memory, weights included: {total:.3f}x; target <= 1.15x: "
        f"{verdict(total <= 1.15)} (growth after the model build alone: {growth:.3f}x)"
    )
    print(
        f"for scale: a reference copy of the model (~{copy:,.0f} MiB, the size of its build) "
        f"would have made it {(med['dpo']['peak'] + copy) / med['sft']['peak']:.2f}x"
    )
    return {"runs": runs, "median_mib": med, "ratio_peak": total, "ratio_growth": growth}


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--repeats", type=int, default=8, help="runs of each path")
    parser.add_argument("--model", choices=["tiny", "medium"], default="tiny")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steadiest on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--memory-model", choices=["tiny", "medium"], default="medium")
    parser.add_argument("--memory-batch-size", type=int, default=4, help="pairs")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=2, help="processes of each")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory comparison")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", choices=["sft", "dpo"], default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child is None and not 1 <= opts.warmup < opts.steps:
        parser.error("need 1 <= --warmup < --steps")

    quiet()
    set_threads(opts.threads)
    import torch

    opts.facts = {}
    opts.tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    atexit.register(shutil.rmtree, opts.tmp, True)  # model config, tokenizer copy, TRL dir
    opts.model_path = model_dir(opts.tmp, opts.model, opts.max_length)
    if opts.child:
        memory_child(opts)
        return

    dm = preference_data(opts)
    stats = dm.stats["train"]
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    trainer = trl_trainer(opts, rows)
    prepared = trainer.train_dataset
    sample = rows[: opts.batch_size]
    v = versions()
    params = n_params(build_model(opts.model_path, opts.seed))
    print(
        f"model: Llama from the {opts.model} config, {params / 1e6:.2f}M parameters, float32, "
        f"sdpa; LoRA r {LORA['r']}, alpha {LORA['alpha']}, dropout {LORA['dropout']}, "
        f"{LORA['target_modules']}; {torch.get_num_threads()} torch threads; "
        f"{os.cpu_count()} CPUs; " + ", ".join(f"{k} {x}" for k, x in v.items())
    )
    print(
        f"data: {DATA.relative_to(ROOT)}: {stats.examples} pairs, {stats.tokens} tokens "
        f"({stats.trained_tokens} trained; TRL {len(prepared)} pairs); max_length "
        f"{opts.max_length}, batch {opts.batch_size} pairs, {opts.steps} steps ({opts.warmup} "
        f"untimed), {opts.repeats} repeats"
    )
    print(pair_token_check(dm, prepared))
    del trainer

    runners = {
        "ours": lambda: run_ours(opts, dm),
        "TRL": lambda: run_trl(opts, prepared, sample),
    }
    measured = run_repeats(runners, opts.repeats, opts.warmup, "pairs", digits=2)

    timed = slice(opts.warmup, opts.steps)
    print()
    print(f"per step (first repeat, timed steps {opts.warmup + 1}..{opts.steps}):")
    for name in runners:
        log = measured.logs[name]
        print(
            f"  {name}: pairs {log.units[timed]}, trained tokens {log.trained[timed]}, "
            f"token positions {log.slots[timed]}"
        )
    start_same = len({round(c, 3) for c in measured.checksums.values()}) == 1
    print(f"  both started from the same base weights (checksum): {start_same}")
    print(
        "  reference = the policy with its adapters disabled (no copy): "
        + ", ".join(f"{k}: {v}" for k, v in opts.facts.items())
    )

    print()
    labels = {
        "ours": "ours: Lightning fit, DPOModule(lora) + PreferenceDataModule",
        "TRL": f"TRL {v['trl']} DPOTrainer(peft_config)",
    }
    rate_table(measured, labels, "pairs", "TRL", digits=2)
    ratios = measured.wall.ratios("ours", "TRL")
    cpu_ratios = measured.cpu.ratios("ours", "TRL")
    ratio_ok = statistics.median(ratios) >= 1.0
    print()
    by_step = measured.step.ratios("ours", "TRL")
    print(
        f"ours/TRL pairs/s: {spread(ratios)}x (by CPU time {spread(cpu_ratios)}x; by median "
        f"step rate {spread(by_step)}x); target >= 1.0: {verdict(ratio_ok)}"
    )

    memory = {} if opts.no_memory else memory_report(opts)

    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(
            json.dumps(
                {
                    "options": json_options(opts),
                    "versions": v,
                    "wall": {"rates": measured.wall.rates, "ratio_ours_trl": ratios},
                    "cpu": {"rates": measured.cpu.rates, "ratio_ours_trl": cpu_ratios},
                    "step": {"rates": measured.step.rates, "ratio_ours_trl": by_step},
                    "same_initial_weights": start_same,
                    "memory": memory,
                    "targets_met": {
                        "ratio_1_0": ratio_ok,
                        "memory_1_15": bool(memory) and memory["ratio_peak"] <= 1.15,
                    },
                },
                indent=2,
            )
            + "\n"
        )
        print(f"results written to {opts.json}")


if __name__ == "__main__":
    main()
