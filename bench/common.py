"""What the training benchmarks share: models from a config, step timing, summaries.

Each benchmark runs our path and its peers in one process, interleaved repeat by repeat
(the order rotating), so that load from other jobs on a shared machine falls on every path
alike; it reports the median ratio over repeats and their spread.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER = ROOT / "assets" / "tiny-llama"
IGNORE_INDEX = -100

# Model shapes, on the committed tiny config (vocabulary, tokenizer, tied embeddings).
MODELS: dict[str, dict[str, Any]] = {
    # the committed assets/tiny-llama config: 256 wide, 4 layers, ~3.4M parameters
    "tiny": {},
    # weights that dominate memory noise: 512 wide, 8 layers, ~32M parameters (128 MB)
    "medium": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
    },
}


def quiet() -> None:
    """No progress bars, info logs or warnings from the libraries (our report stays readable)."""
    import datasets
    import lightning.pytorch  # noqa: F401  (sets up its loggers, whose levels are set below)
    import transformers

    datasets.disable_caching()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "src"):
        logging.getLogger(name).setLevel(logging.ERROR)


def set_threads(n: int) -> None:
    """``n`` torch threads (0: torch's default). One thread is the default of the benchmarks:
    on a machine shared with other jobs, a multi-threaded kernel waits for its slowest thread
    whenever another process holds a core, and the timings swing several-fold."""
    import torch

    if n > 0:
        torch.set_num_threads(n)


def versions() -> dict[str, str]:
    import lightning
    import peft
    import torch
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }


def model_dir(root: Path, name: str, max_length: int) -> Path:
    """A directory holding the config of model ``name`` and the committed tokenizer, so our
    module (``model_name_or_path`` + ``from_scratch``) and the peers build the same model."""
    config = json.loads((TOKENIZER / "config.json").read_text())
    config.update(MODELS[name])
    config["max_position_embeddings"] = max(config["max_position_embeddings"], max_length)
    path = root / f"model-{name}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for file in TOKENIZER.iterdir():
        if file.name != "config.json":
            shutil.copy(file, path / file.name)
    return path


def build_model(path: Path, seed: int) -> Any:
    """The model as ``CausalLMModule.load_model`` builds it from a config (float32, sdpa),
    initialised after seeding torch with ``seed``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.train()


def weights_checksum(model: Any) -> float:
    """A cheap fingerprint of the (base) weights, to show both paths start from the same ones."""
    import torch

    with torch.no_grad():
        return float(sum(p.double().sum() for n, p in model.named_parameters() if "lora_" not in n))


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def adamw(lr: float) -> Callable[..., Any]:
    """The one optimizer of every path: ``torch.optim.AdamW`` with its defaults but ``lr``
    and no weight decay (Lightning's ``OptimizerCallable``: parameters -> optimizer)."""
    import torch

    def make(params: Any) -> Any:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    return make


# ------------------------------------------------------------------------------ memory
def status_kib(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``: resident now, ``VmHWM``: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset the peak resident set (VmHWM) to the current one (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ timing
@dataclass
class StepLog:
    """``perf_counter`` at the end of every optimizer step, and what each step trained on."""

    ends: list[float] = field(default_factory=list)
    cpu_ends: list[float] = field(default_factory=list)  # process CPU time, all threads
    units: list[int] = field(default_factory=list)  # real tokens (SFT) or pairs (DPO)
    trained: list[int] = field(default_factory=list)  # label tokens (after the shift)
    slots: list[int] = field(default_factory=list)  # token positions of the batch tensors

    def end(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    def step(self, units: int, trained: int, slots: int) -> None:
        self.end()
        self.units.append(units)
        self.trained.append(trained)
        self.slots.append(slots)

    def rate(self, warmup: int, cpu: bool = False) -> tuple[float, int, float]:
        """(units per second, units, seconds) over the steps after ``warmup``: from the end of
        the last warmup step to the end of the last step, so each timed step's data loading,
        forward, backward, optimizer step and framework work are counted exactly once.
        ``cpu``: per second of the process's CPU time instead of wall-clock time (time spent
        waiting for a core taken by another job is left out)."""
        ends = self.cpu_ends if cpu else self.ends
        if not 1 <= warmup < len(ends):
            raise RuntimeError(f"{len(ends)} steps ran; need more than warmup ({warmup}) >= 1")
        seconds = ends[-1] - ends[warmup - 1]
        units = sum(self.units[warmup:])
        return units / seconds, units, seconds


@dataclass
class Repeats:
    """Rates of each path over the repeats, in order."""

    rates: dict[str, list[float]] = field(default_factory=dict)

    def add(self, path: str, rate: float) -> None:
        self.rates.setdefault(path, []).append(rate)

    def median(self, path: str) -> float:
        return statistics.median(self.rates[path])

    def best(self, path: str) -> float:
        return max(self.rates[path])

    def ratios(self, num: str, den: str) -> list[float]:
        """Per-repeat ratios (paths of one repeat ran back to back under similar load)."""
        return [a / b for a, b in zip(self.rates[num], self.rates[den], strict=True)]


def spread(values: Sequence[float]) -> str:
    """``median (min to max)`` of ratios."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.3f}"
    return f"{med:.3f} ({min(values):.3f} to {max(values):.3f})"


def order(paths: Sequence[str], r: int) -> list[str]:
    """The order of the paths in repeat ``r``: rotated, and reversed every other repeat, so
    that no path always runs first, nor always after the same one."""
    k = (r // 2) % len(paths)
    turn = list(paths[k:]) + list(paths[:k])
    return turn[::-1] if r % 2 else turn


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def run_lightning_fit(
    module: Any,
    fit_kwargs: dict[str, Any],
    steps: int,
    log: StepLog,
    count: Callable[[dict[str, Any]], tuple[int, int, int]],
    shuffle_seed: int,
) -> Any:
    """A Lightning fit of ``module`` for ``steps`` optimizer steps with nothing else on: no
    logger, checkpoints, progress bar, model summary or validation; ``log`` gets the end of
    every step (``on_train_batch_end``, after the optimizer step) and ``count(batch)``.
    torch is seeded with ``shuffle_seed`` as the fit starts, before the loader is built (a
    ``StatefulDataLoader`` draws its shuffle seed then), so that other paths seeded alike see
    the same batches."""
    import lightning.pytorch as pl
    import torch

    class StepTimer(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            torch.manual_seed(shuffle_seed)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            log.step(*count(batch))

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[StepTimer()],
    )
    trainer.fit(module, **fit_kwargs)
    return trainer


@dataclass
class Measured:
    """What ``run_repeats`` measured: rates by wall-clock and by CPU time, the first
    repeat's step logs and each path's initial-weights checksum."""

    wall: Repeats
    cpu: Repeats
    logs: dict[str, StepLog]
    checksums: dict[str, float]
    # per run, the median over its timed steps of units / step time: a rate that the few
    # steps slowed by a burst of load from another job do not move
    step: Repeats = field(default_factory=Repeats)


def run_repeats(
    runners: dict[str, Callable[[], tuple[StepLog, float]]],
    repeats: int,
    warmup: int,
    unit: str,
    digits: int = 0,
) -> Measured:
    """Every path once per repeat, in changing order; prints a line per repeat. Garbage
    is collected before each run, so no path pays for the previous one's."""
    measured = Measured(Repeats(), Repeats(), {}, {})
    names = list(runners)
    for r in range(repeats):
        line = []
        for name in order(names, r):
            gc.collect()
            log, checksum = runners[name]()
            measured.step.add(
                name,
                statistics.median(
                    units / (end - before)
                    for units, before, end in zip(
                        log.units[warmup:], log.ends[warmup - 1 :], log.ends[warmup:], strict=False
                    )
                ),
            )
            rate, _, seconds = log.rate(warmup)
            cpu_rate, _, cpu_seconds = log.rate(warmup, cpu=True)
            measured.wall.add(name, rate)
            measured.cpu.add(name, cpu_rate)
            measured.logs.setdefault(name, log)
            measured.checksums.setdefault(name, checksum)
            line.append(
                f"{name} {rate:,.{digits}f} {unit}/s ({seconds:.1f}s, CPU {cpu_seconds:.1f}s)"
            )
        print(f"repeat {r + 1}/{repeats}: " + "; ".join(line))
    return measured


def rate_table(
    measured: Measured, labels: dict[str, str], unit: str, peer: str, digits: int = 0
) -> None:
    """A markdown table: each path's median rate over the repeats and its median per-repeat
    ratio to ``peer``; then the same ratio by CPU time, and by each run's median step rate."""
    n = len(next(iter(measured.wall.rates.values())))
    print(
        f"| path | {unit}/s (median of {n}) | ratio to {peer} | ratio by CPU time "
        "| ratio by median step rate |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, label in labels.items():
        wall = statistics.median(measured.wall.ratios(name, peer))
        cpu = statistics.median(measured.cpu.ratios(name, peer))
        step = statistics.median(measured.step.ratios(name, peer))
        print(
            f"| {label} | {measured.wall.median(name):,.{digits}f} | {wall:.2f}x | {cpu:.2f}x "
            f"| {step:.2f}x |"
        )


def json_options(opts: Any) -> dict[str, Any]:
    return {k: str(x) if isinstance(x, Path) else x for k, x in vars(opts).items()}
