"""GPU training throughput and MFU of this template's own training path, one H200 (or H100).

A Qwen2.5-1.5B-shaped model initialised from its config (no download), trained through
``SFTModule`` / ``DPOModule`` in a Lightning ``Trainer`` (bf16-true), on synthetic packed
rows (documents of random lengths, ``position_ids`` restarting per document) built by our
collator. Each setting runs in its own process (compile caches and memory do not mix) and
reports real tokens/s and MFU (``src/callbacks/throughput.py``'s FLOP count over the
device's dense bf16 peak):

    python bench/gpu.py                                 # the grid below, SFT then DPO
    python bench/gpu.py --objective sft --attn sdpa flex_attention --compile 0 1
    python bench/gpu.py --record                        # also append to bench/RESULTS.md
    python bench/gpu.py --smoke                         # a tiny model on the CPU (tests)

Grid: attention sdpa, flex_attention and (if installed) flash_attention_2; with and without
per-layer activation checkpointing and ``torch.compile``; Liger kernels if installed; the lean
and the full LM head (``--lm-head``; peak memory shows what the lean head saves).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN_1_5B = {  # Qwen2.5-1.5B's shape
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
TINY = {**QWEN_1_5B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip


def synthetic_rows(n_rows: int, seq_len: int, vocab: int, pairs: bool, seed: int = 0):
    """Packed SFT rows (several documents each) or preference pairs of random tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        if pairs:
            prompt = torch.randint(10, vocab, (seq_len // 4,), generator=g).tolist()
            side = {}
            for name in ("chosen", "rejected"):
                n = int(torch.randint(seq_len // 8, seq_len // 2, (1,), generator=g))
                response = torch.randint(10, vocab, (n,), generator=g).tolist()
                side[f"{name}_input_ids"] = prompt + response
                side[f"{name}_labels"] = [-100] * len(prompt) + response
            rows.append(side)
            continue
        lengths, room = [], seq_len
        shortest = max(8, seq_len // 64)
        while room > shortest:
            n = min(room, int(torch.randint(shortest, seq_len // 2, (1,), generator=g)))
            lengths.append(n)
            room -= n
        ids = torch.randint(10, vocab, (sum(lengths),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "seq_lengths": lengths})
    return rows


def run_one(setting: dict) -> dict:
    """One timed fit in this process; returns its figures."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from src.callbacks.throughput import device_peak_tflops, flops_per_token, non_embedding_params
    from src.datamodules.collate import Collator, PreferenceCollator
    from src.modules import DPOModule, SFTModule

    smoke = setting["smoke"]
    shape = TINY if smoke else QWEN_1_5B
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps(shape))
    dpo = setting["objective"] == "dpo"
    seq = setting["seq_len"]
    steps, warmup = setting["steps"], setting["warmup"]
    rows = synthetic_rows(setting["batch"] * (steps + warmup), seq, shape["vocab_size"], dpo)
    collate = PreferenceCollator(0) if dpo else Collator(0)
    loader = DataLoader(rows, batch_size=setting["batch"], collate_fn=collate)
    kwargs = {
        "model_name_or_path": str(model_dir),
        "from_scratch": True,
        "tokenizer": str(ROOT / "assets" / "tiny-llama"),
        "max_length": seq,
        "torch_dtype": "float32" if smoke else "bfloat16",
        "attn_implementation": setting["attn"],
        "gradient_checkpointing": setting["checkpointing"],
        "compile": setting["compile"],
        "liger_kernels": setting["liger"],
        "lm_head": setting["lm_head"],
        "scheduler": "constant",
    }
    module = DPOModule(**kwargs) if dpo else SFTModule(**kwargs)

    class Clock(pl.Callback):
        tokens = 0
        start = end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start = time.perf_counter()
            if batch_idx >= warmup:
                self.tokens += int(batch["real_tokens"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warmup + steps - 1:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.end = time.perf_counter()

    clock = Clock()
    trainer = pl.Trainer(
        accelerator="cpu" if smoke else "gpu",
        devices=1,
        precision="32-true" if smoke else "bf16-true",
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=loader)
    seconds = clock.end - clock.start
    tokens_per_s = clock.tokens / seconds
    n_params = non_embedding_params(module.model)
    fpt = flops_per_token(module.model.config, n_params, seq)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = device_peak_tflops(name)
    mfu = tokens_per_s * fpt / (peak * 1e12) if peak else None
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {**setting, "device": name, "tokens_per_s": tokens_per_s, "mfu": mfu,
            "peak_memory_gb": memory}  # fmt: skip


def grid(args: argparse.Namespace) -> list[dict]:
    attns = [a for a in args.attn if a != "flash_attention_2" or _installed("flash_attn")]
    livers = [False, True] if _installed("liger_kernel") and not args.no_liger else [False]
    settings = []
    for objective, attn, ckpt, comp, liger, head in itertools.product(
        args.objective, attns, args.checkpointing, args.compile, livers, args.lm_head
    ):
        settings.append(
            {
                "objective": objective,
                "attn": attn,
                "checkpointing": bool(ckpt),
                "compile": bool(comp),
                "liger": liger,
                "lm_head": head,
                "seq_len": args.seq_len if objective == "sft" else args.seq_len // 2,
                "batch": args.batch,
                "steps": args.steps,
                "warmup": args.warmup,
                "smoke": args.smoke,
            }
        )
    return settings


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objective", nargs="+", default=["sft", "dpo"])
    parser.add_argument(
        "--attn", nargs="+", default=["sdpa", "flex_attention", "flash_attention_2"]
    )
    parser.add_argument("--checkpointing", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--compile", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--no-liger", action="store_true")
    parser.add_argument("--lm-head", nargs="+", default=["lean", "full"], choices=["lean", "full"])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a setting, run in this process
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    if args.smoke:
        args.seq_len, args.steps, args.warmup = 128, 2, 1
    results = []
    for setting in grid(args):
        out = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(setting)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            error = (out.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({**setting, "error": error[:160]})
        else:
            results.append(json.loads(line[len("RESULT ") :]))
        print(_row(results[-1]), flush=True)
    table = _table(results)
    print("\n" + table)
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(f"\n## bench/gpu.py, {time.strftime('%Y-%m-%d')}\n\n{table}\n")


def _row(r: dict) -> str:
    what = (
        f"| {r['objective']} | {r['attn']} | {'yes' if r['checkpointing'] else 'no'} | "
        f"{'yes' if r['compile'] else 'no'} | {'yes' if r['liger'] else 'no'} | "
        f"{r['lm_head']} | "
    )
    if "error" in r:
        return what + f"failed: {r['error']} | | |"
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
    return what + f"{r['tokens_per_s']:,.0f} | {mfu} | {memory} |"


def _table(results: list[dict]) -> str:
    device = next((r["device"] for r in results if "device" in r), "?")
    head = (
        f"device: {device}; seq {results[0]['seq_len'] if results else '?'} (DPO: per side), "
        f"batch {results[0]['batch'] if results else '?'}, "
        f"{'fp32 (smoke run)' if results and results[0]['smoke'] else 'bf16-true'}\n\n"
        "| objective | attention | layer checkpointing | compile | liger | LM head | tokens/s "
        "| MFU | peak GiB |\n|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(_row(r) for r in results)])


if __name__ == "__main__":
    main()
