"""The LM head's memory and time: full logits against the lean head, and packed DPO.

Head: one training step (forward, backward, SGD step) of ``SFTModule`` and ``DPOModule``
with ``lm_head: full`` and ``lm_head: lean`` on model shapes whose head is a real one's:

- ``qwen2.5-0.5b``: Qwen2.5-0.5B cut to 2 decoder layers (hidden 896, vocabulary 151,936,
  tied embeddings, its MLP and attention widths);
- ``llama3-8b-head``: Llama-3-8B's head (hidden 4096, vocabulary 128,256, untied) on 2
  decoder layers whose MLP is cut to 1024 wide (so that a CPU step takes minutes, not an
  hour); its input embedding is frozen (the head's memory is what is compared).

SFT trains one row of ``T`` tokens, every position a label (the lean head's worst case: no
prompt tokens to skip); DPO one pair, chosen and rejected ``T / 2`` tokens each, the first
quarter of each a shared prompt, with precomputed reference log-probs (no reference model).
Every measurement runs in a fresh process: the step's peak resident memory above the
resident memory at its start (``VmHWM`` reset by ``/proc/self/clear_refs``; weights and the
optimizer are there before, the gradients, activations and logits are not), and its
wall-clock time; the first step warms up, the last is reported (``--steps``).

Packed DPO: a Lightning fit of ``DPOModule`` (the tiny model, a frozen reference copy,
``--attn``: ``sdpa_varlen`` by default, which is plain sdpa on padded rows) on the
demo preference pairs, padded against packed into rows of ``--pack-length`` tokens, each
with about the same token positions per step; pairs per second and padding efficiency
(real tokens over token positions of the batches), repeats interleaved.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    TOKENIZER,
    StepLog,
    adamw,
    json_options,
    model_dir,
    quiet,
    reset_peak,
    run_lightning_fit,
    run_repeats,
    set_threads,
    spread,
    status_kib,
    verdict,
    versions,
)

from src.modules.head import DEFAULT_CHUNK_SIZE  # noqa: E402  (common puts the root on the path)

DATA = ROOT / "data" / "demo" / "preference_train.jsonl"
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "llama3-8b-head": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 1024,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    # --smoke: the same code paths in seconds
    "smoke": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
        "tie_word_embeddings": True,
    },
}
HEADS = ("full", "lean")
PAGE_GIB = 4 / 2**20
TARGET_PEAK, TARGET_TIME, TARGET_EFFICIENCY, TARGET_PAIRS = 0.35, 1.05, 0.95, 1.3


# -------------------------------------------------------------------------- one step
def shape_dir(root: Path, shape: str, tokens: int) -> Path:
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        num_hidden_layers=2,
        max_position_embeddings=max(4096, tokens),
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
        **spec,
    )
    path = root / shape
    config.save_pretrained(path)
    return path


def step_batch(objective: str, tokens: int, vocab: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    if objective == "sft":
        ids = torch.randint(2, vocab, (1, tokens), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    half, prompt = tokens // 2, tokens // 8  # a quarter of each sequence is the prompt
    shared = torch.randint(2, vocab, (1, prompt), generator=g)
    batch: dict[str, Any] = {}
    for side in ("chosen", "rejected"):
        ids = torch.cat([shared, torch.randint(2, vocab, (1, half - prompt), generator=g)], 1)
        labels = ids.clone()
        labels[:, :prompt] = -100
        batch |= {
            f"{side}_input_ids": ids,
            f"{side}_attention_mask": torch.ones_like(ids),
            f"{side}_labels": labels,
            f"ref_{side}_logps": torch.zeros(1),
        }
    return batch


def step_child(spec: dict[str, Any]) -> None:
    """One measurement: prints a ``STEP`` JSON line."""
    import torch

    from src.modules import DPOModule, SFTModule

    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    atexit.register(shutil.rmtree, tmp, True)
    path = shape_dir(tmp, spec["shape"], spec["tokens"])
    cls = DPOModule if spec["objective"] == "dpo" else SFTModule
    extra = {"precompute_ref_logps": True} if spec["objective"] == "dpo" else {}
    module = cls(
        model_name_or_path=str(path),
        from_scratch=True,
        tokenizer=str(TOKENIZER),
        attn_implementation="sdpa",
        lm_head=spec["head"],
        lm_head_chunk_size=spec["chunk_size"],
        **extra,
    )
    torch.manual_seed(0)
    module.configure_model()
    model = module.model.train()
    if not model.config.tie_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4)
    batch = step_batch(spec["objective"], spec["tokens"], model.config.vocab_size, seed=1)
    steps = []
    for _ in range(spec["steps"]):
        gc.collect()
        start = status_kib("VmRSS")
        reset = reset_peak()
        begin = time.perf_counter()
        terms = module.loss_terms(batch)
        loss = terms.loss_sum / terms.count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - begin
        # what both heads must agree on: SFT's mean loss; DPO's per-sequence log-prob sums
        # (its loss, a sigmoid of their difference, can sit far in a tail)
        agree = (
            [loss.item()]
            if spec["objective"] == "sft"
            else [
                terms.sums["logps/chosen"].item(),
                terms.sums["logps/rejected"].item(),
            ]
        )
        steps.append(
            {
                "loss": loss.item(),
                "agree": agree,
                "seconds": seconds,
                "peak_above_start_mib": (status_kib("VmHWM") - start) / 1024,
                "start_mib": start / 1024,
                "peak_reset": reset,
            }
        )
        del terms
    out = {**spec, "params": sum(p.numel() for p in model.parameters()), "steps": steps}
    print("STEP " + json.dumps(out))


def measure_step(opts: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    args = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    args += ["--threads", str(opts.threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("STEP ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"the step {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


def head_report(opts: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    print(
        "| shape | objective | tokens | peak full (GiB) | peak lean (GiB) | lean/full "
        "| step full (s) | step lean (s) | lean/full | same loss |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for shape in opts.shapes:
        for tokens in opts.tokens:
            for objective in opts.objectives:
                # alternate which head runs first, so neither always meets the same load
                heads = HEADS if len(rows) % 2 == 0 else HEADS[::-1]
                spec = {"shape": shape, "objective": objective, "tokens": tokens}
                spec |= {"steps": opts.steps, "chunk_size": opts.chunk_size}
                got = {h: measure_step(opts, {**spec, "head": h}) for h in heads}
                last = {h: got[h]["steps"][-1] for h in HEADS}
                peak = {h: last[h]["peak_above_start_mib"] / 1024 for h in HEADS}
                secs = {h: last[h]["seconds"] for h in HEADS}
                same = all(
                    abs(a - b) <= 1e-5 * abs(b)
                    for a, b in zip(last["lean"]["agree"], last["full"]["agree"], strict=True)
                )
                row = {
                    **spec,
                    "peak_gib": peak,
                    "seconds": secs,
                    # at a page (4 KiB) at least: a smoke step can grow by less than one
                    "peak_ratio": max(peak["lean"], PAGE_GIB) / max(peak["full"], PAGE_GIB),
                    "time_ratio": secs["lean"] / secs["full"],
                    "same_loss": same,
                    "loss": {h: last[h]["loss"] for h in HEADS},
                    "params": got["full"]["params"],
                }
                rows.append(row)
                print(
                    f"| {shape} | {objective} | {tokens} | {peak['full']:.2f} | "
                    f"{peak['lean']:.2f} | {row['peak_ratio']:.3f}x | {secs['full']:.1f} | "
                    f"{secs['lean']:.1f} | {row['time_ratio']:.3f}x | {same} |"
                )
    longest = max(opts.tokens)
    at = [r for r in rows if r["tokens"] == longest]
    worst_peak = max(r["peak_ratio"] for r in at)
    worst_time = max(r["time_ratio"] for r in rows)
    print(
        f"lean/full step peak at {longest} tokens, worst: {worst_peak:.3f}x; target <= "
        f"{TARGET_PEAK}x: {verdict(worst_peak <= TARGET_PEAK)}"
    )
    print(
        f"lean/full step time, worst: {worst_time:.3f}x; target <= {TARGET_TIME}x: "
        f"{verdict(worst_time <= TARGET_TIME)}"
    )
    print(
        "lean and full agree (1e-5 relative; SFT: the loss, DPO: the log-prob sums) in every "
        "row: "
        f"{all(r['same_loss'] for r in rows)}"
    )
    return rows


# ------------------------------------------------------------------------ packed DPO
def pairs_data(opts: argparse.Namespace, packed: bool) -> Any:
    from src.datamodules import PreferenceDataModule

    dm = PreferenceDataModule(
        tokenizer=str(TOKENIZER),
        train_files=str(opts.data),
        val_split=0,
        max_length=opts.pack_length // 2,
        batch_size=opts.packed_batch_size if packed else opts.batch_size,
        packing=packed,
        pack_length=opts.pack_length,
        cache_dir=None,
    )
    dm.setup("fit")
    return dm


def pair_units(batch: dict[str, Any]) -> tuple[int, int, int]:
    """(pairs, real tokens, token positions) of a padded or packed preference batch."""
    pairs = batch["examples"] if "examples" in batch else batch["chosen_input_ids"].shape[0]
    return int(pairs), int(batch["real_tokens"]), int(batch["token_slots"])


def packed_report(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    from src.modules import DPOModule

    path = model_dir(opts.tmp, "tiny", opts.pack_length)
    data = {name: pairs_data(opts, name == "packed") for name in ("padded", "packed")}

    def runner(name: str) -> Any:
        def run() -> tuple[StepLog, float]:
            module = DPOModule(
                model_name_or_path=str(path),
                from_scratch=True,
                tokenizer=str(TOKENIZER),
                attn_implementation=opts.attn,
                optimizer=adamw(5e-4),
                scheduler="constant",
                warmup=0,
            )
            torch.manual_seed(opts.seed)
            module.configure_model()
            log = StepLog()
            fit = {"datamodule": data[name]}
            run_lightning_fit(module, fit, opts.packed_steps, log, pair_units, opts.seed + 1)
            return log, 0.0

        return run

    measured = run_repeats(
        {name: runner(name) for name in data}, opts.repeats, opts.warmup, "pairs", 1
    )
    efficiency = {name: sum(log.trained) / sum(log.slots) for name, log in measured.logs.items()}
    ratios = measured.wall.ratios("packed", "padded")
    stats = data["packed"].stats["train"]
    print(
        f"demo pairs: {stats.examples} pairs, {stats.tokens} tokens; packed into "
        f"{stats.packed_rows} rows of {opts.pack_length}; attention {opts.attn}; padded batches "
        f"of {opts.batch_size} "
        f"pairs, packed batches of {opts.packed_batch_size} rows"
    )
    print("| path | pairs/s (median) | padding efficiency |")
    print("|---|---:|---:|")
    for name in data:
        print(f"| {name} | {measured.wall.median(name):.1f} | {efficiency[name]:.3f} |")
    ratio = statistics.median(ratios)
    print(
        f"packed/padded pairs/s: {spread(ratios)}x; target >= {TARGET_PAIRS}x: "
        f"{verdict(ratio >= TARGET_PAIRS)}"
    )
    print(
        f"packed padding efficiency {efficiency['packed']:.3f}; target >= "
        f"{TARGET_EFFICIENCY}: {verdict(efficiency['packed'] >= TARGET_EFFICIENCY)}"
    )
    return {
        "pairs_per_sec": {n: measured.wall.rates[n] for n in data},
        "ratio": ratio,
        "efficiency": efficiency,
    }


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "llama3-8b-head"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--objectives", nargs="+", default=["sft", "dpo"])
    parser.add_argument("--steps", type=int, default=2, help="steps per process (last timed)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="lean chunk")
    parser.add_argument("--pack-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16, help="padded: pairs per step")
    parser.add_argument("--packed-batch-size", type=int, default=2, help="packed: rows per step")
    parser.add_argument("--packed-steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (packed)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each packed path")
    parser.add_argument(
        "--attn", default="sdpa_varlen", help="packed DPO's attention (sdpa: one mask a row)"
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--no-head", action="store_true", help="skip the head comparison")
    parser.add_argument("--no-packed", action="store_true", help="skip packed DPO")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the code paths only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    quiet()
    set_threads(opts.threads)
    if opts.child:
        step_child(json.loads(opts.child))
        return
    opts.tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    atexit.register(shutil.rmtree, opts.tmp, True)
    if opts.smoke:  # the code paths in seconds: a tiny shape, 200 of the demo pairs
        opts.shapes, opts.tokens, opts.packed_steps, opts.repeats = ["smoke"], [64], 3, 1
        opts.pack_length, opts.batch_size, opts.warmup = 256, 4, 1
        lines = opts.data.read_text().splitlines(keepends=True)[:200]
        opts.data = opts.tmp / "pairs.jsonl"
        opts.data.write_text("".join(lines))
    info = versions()
    print(f"versions: {info}; torch threads {opts.threads}; lean chunk {opts.chunk_size}")
    results: dict[str, Any] = {"options": json_options(opts), "versions": info}
    if not opts.no_head:
        results["head"] = head_report(opts)
    if not opts.no_packed:
        results["packed"] = packed_report(opts)
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
