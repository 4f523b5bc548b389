"""Search a learning rate and a batch size for any config, before a long run.

    python train.py lr_find --config configs/sft.yaml [fit arguments] [--min_lr 1e-7 ...]
    python train.py scale_batch_size --config configs/sft.yaml [fit arguments] [--max_trials 6]

The run is built as ``fit`` builds it (``src.cli.cli_main(args, run=False)``: the same model,
data, optimizer, schedule, precision and strategy), then Lightning's ``Tuner`` searches:

- ``lr_find`` trains ``--num_training`` steps with the learning rate rising from ``--min_lr``
  to ``--max_lr`` and suggests the rate where the loss fell fastest;
- ``scale_batch_size`` doubles ``data.batch_size`` (``--mode power``; ``binsearch`` refines
  after the first failure) for a few steps each until a batch runs out of memory.

The suggestion is printed with the command-line setting to use, and written, with every
point of the search, to ``runs/<experiment>/tune/`` (``lr_find.png`` and ``lr_find.json``,
``scale_batch_size.json``): beside the experiment's ``version_N`` runs, not one of them, since
a search keeps nothing it trains. Lightning restores the weights when the search is done.

Only the search runs: the fit's callbacks (validation at start, sample generation,
checkpoints, the Hugging Face export, the diagnosis...) and its loggers are removed, and
there is no validation. The learning-rate finder replaces the config's schedule (warmup
included) by its own ramp.

Three mends to Lightning's searches (2.6):

- Its finder records the value ``training_step`` returns, here a sum over label tokens scaled
  for backward, and debiases its running mean with the step count after the step (``1 -
  beta**(k+1)`` at step ``k``): the first smoothed point is half the loss, and the curve rises
  for tens of steps whatever the rate (Lightning-AI/pytorch-lightning#14167). The finder here
  records each step's ``train/loss`` (the mean over the step's label tokens, over devices)
  and smooths it alike, debiased by ``1 - beta**k``; the divergence stop and the suggestion
  use that curve.
- Its batch-size scaler builds the first trial's loader before it sets ``--init_val``: the
  first trial trained on the config's batch size. The data module starts at ``--init_val``.
- Both write a temporary checkpoint of the weights to ``trainer.default_root_dir`` (the
  working directory): it goes to the tune directory, and is removed when the search ends.

Off a terminal (a log file, a batch job) the finder's progress bar, a line per step there,
gives way to a ``[lr_find] step ...`` line every tenth of the steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.tuner.lr_finder import _LRCallback

from src.errors import ConfigError
from src.strategies import engine_owns_gradients, missing_requirements

TUNE_COMMANDS = ("lr_find", "scale_batch_size")
TUNE_DIRNAME = "tune"  # under runs/<experiment>/
LR_KEY = "model.init_args.optimizer.init_args.lr"
BATCH_KEY = "data.init_args.batch_size"
# Without a CUDA device nothing runs out of memory the way Lightning detects (a CPU swaps or
# is killed instead): the doubling stops after this many trials (2, 4, 8, 16 from 2).
UNBOUNDED_DEVICE = "cuda"
OTHER_DEVICE_MAX_TRIALS = 4
NEVER = 2**62  # a validation interval no search reaches
BETA = 0.98  # the finder's smoothing, as Lightning's
LOSS_TAG = "train/loss"  # the step's mean loss, as every module of ours logs it
DESCRIPTIONS = {
    "lr_find": "Train a few steps with a rising learning rate and suggest the one where the "
    "loss falls fastest.",
    "scale_batch_size": "Double the batch size for a few steps each until it runs out of "
    "memory, and say the largest that ran.",
}


def main(command: str, argv: list[str]) -> dict[str, Any]:
    """Run ``command`` (``lr_find`` or ``scale_batch_size``) with the search options and fit
    arguments of ``argv``; print the result and write it. Returns what was written."""
    options, fit_args = parser(command).parse_known_args(argv)
    check(command, options)  # before the model and data are built
    cli, out = build(fit_args)
    out.mkdir(parents=True, exist_ok=True)  # the temporary checkpoint goes there too
    with root_dir(cli.trainer, out):
        search = lr_find if command == "lr_find" else scale_batch_size
        result = search(cli, options)
    if command == "lr_find" and cli.trainer.is_global_zero:
        result["plot"] = write_plot(result, out / "lr_find.png")
    result = {"command": command, "args": argv, "time": _now(), **result}
    if cli.trainer.is_global_zero:
        path = out / f"{command}.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        print(report(result, out), flush=True)
    return result


def parser(command: str) -> argparse.ArgumentParser:
    """The search options of ``command``; every other argument is a ``fit`` argument."""
    p = argparse.ArgumentParser(
        prog=f"python train.py {command}",
        allow_abbrev=False,  # a fit argument is never mistaken for a prefix of these
        description=DESCRIPTIONS[command],
        epilog="Every other argument is a fit argument (python train.py fit --help): "
        "--config FILE, --trainer..., --model..., --data...",
    )
    if command == "lr_find":
        p.add_argument("--min_lr", type=float, default=1e-8, help="first learning rate")
        p.add_argument("--max_lr", type=float, default=1.0, help="last learning rate")
        p.add_argument("--num_training", type=int, default=100, help="optimizer steps")
        p.add_argument("--mode", choices=("exponential", "linear"), default="exponential")
        p.add_argument(
            "--early_stop_threshold",
            type=float,
            default=4.0,
            help="stop once the loss is this many times its best (0: never)",
        )
    else:
        p.add_argument("--mode", choices=("power", "binsearch"), default="power")
        p.add_argument("--init_val", type=int, default=2, help="first batch size")
        p.add_argument("--steps_per_trial", type=int, default=3, help="steps per batch size")
        p.add_argument(
            "--max_trials",
            type=int,
            default=None,
            help="most batch sizes tried (default: 25 on a CUDA GPU, "
            f"{OTHER_DEVICE_MAX_TRIALS} elsewhere, where nothing runs out of memory)",
        )
        p.add_argument("--max_val", type=int, default=8192, help="largest batch size tried")
        p.add_argument("--margin", type=float, default=0.05, help="binsearch: keep this share free")
    return p


def check(command: str, options: argparse.Namespace) -> None:
    """Refuse search options that cannot work."""
    if command == "lr_find":
        if options.min_lr <= 0 or options.max_lr <= options.min_lr:
            raise ConfigError(
                f"lr_find: --min_lr must be above 0 and below --max_lr, got {options.min_lr} "
                f"and {options.max_lr}"
            )
        if options.num_training < 2:
            raise ConfigError(
                f"lr_find: --num_training must be at least 2, got {options.num_training}"
            )
        return
    for name in ("init_val", "steps_per_trial", "max_trials", "max_val"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ConfigError(f"scale_batch_size: --{name} must be at least 1, got {value}")
    if not 0 <= options.margin < 1:
        raise ConfigError(f"scale_batch_size: --margin must be in [0, 1), got {options.margin}")


def build(fit_args: list[str]) -> tuple[Any, Path]:
    """The fit's CLI for ``fit_args``, its trainer stripped to what a search needs, and the
    directory the search writes to."""
    from src.cli import cli_main

    cli = cli_main(list(fit_args), run=False)
    trainer = cli.trainer
    if engine_owns_gradients(trainer.strategy):
        raise ConfigError(
            f"the learning-rate and batch-size searches do not run under "
            f"{type(trainer.strategy).__name__}, which keeps the optimizer and its schedule to "
            "itself: search on one device (--trainer.strategy auto --trainer.devices 1), then "
            "train with it"
        )
    # the search's own callback is put first by the Tuner; nothing else runs, in any hook
    trainer.callbacks = [c for c in trainer.callbacks if isinstance(c, ProgressBar)]
    out = search_dir(trainer)  # the loggers know where: ask before they go
    trainer.loggers = []
    trainer.check_val_every_n_epoch = None
    trainer.val_check_interval = NEVER
    return cli, out


@contextmanager
def root_dir(trainer: pl.Trainer, path: Path) -> Iterator[None]:
    """``trainer.default_root_dir`` at ``path`` for the search: Lightning's searches write their
    temporary checkpoint there, and would leave one in the working directory if killed."""
    saved = trainer._default_root_dir  # no public setter
    trainer._default_root_dir = str(path)
    try:
        yield
    finally:
        trainer._default_root_dir = saved


def search_dir(trainer: pl.Trainer) -> Path:
    """``runs/<experiment>/tune``: beside the runs of the config's experiment."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger | CSVLogger):
            return Path(logger.root_dir) / TUNE_DIRNAME
    return Path(trainer.default_root_dir) / TUNE_DIRNAME


# ------------------------------------------------------------------- learning-rate finder


def lr_find(cli: Any, options: argparse.Namespace) -> dict[str, Any]:
    """Lightning's learning-rate finder on the CLI's model and data: the suggestion and the
    curve."""
    threshold = options.early_stop_threshold or None
    with search_hooks(cli.model, threshold=threshold, steps=options.num_training) as seen:
        finder = Tuner(cli.trainer).lr_find(
            cli.model,
            datamodule=cli.datamodule,
            min_lr=options.min_lr,
            max_lr=options.max_lr,
            num_training=options.num_training,
            mode=options.mode,
            early_stop_threshold=None,  # the hooks stop on the debiased curve instead
            update_attr=False,  # the rate lives in the optimizer's config, not on the module
        )
    if finder is None:
        raise ConfigError("lr_find does not run with trainer.fast_dev_run: leave it out")
    lrs = [float(x) for x in finder.results.get("lr", [])]
    raw, losses = seen.losses, seen.smoothed
    if len(raw) != len(lrs):
        raise ConfigError(
            f"lr_find reads the {LOSS_TAG} that the module logs at every optimizer step: "
            f"{type(cli.model).__name__} logged it {len(raw)} times in {len(lrs)} steps"
        )
    suggestion = suggest(lrs, losses, options.mode)
    finite = [(lr, loss) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    lowest = min(finite, key=lambda p: p[1]) if finite else None
    return {
        "suggestion": float(suggestion) if suggestion is not None else None,
        "config_lr": _float(cli.config.get(LR_KEY)),
        "min_lr": options.min_lr,
        "max_lr": options.max_lr,
        "num_training": options.num_training,
        "mode": options.mode,
        "early_stop_threshold": threshold,
        "steps_run": len(lrs),
        "stopped_early": len(lrs) < options.num_training,
        "lowest": {"lr": lowest[0], "loss": lowest[1]} if lowest else None,
        "config_file": _config_file(cli),
        "lr": lrs,
        "loss": raw,  # each step's mean loss, as train/loss logs it
        "smoothed_loss": losses,  # its running mean, debiased: the curve the suggestion reads
    }


def suggest(lrs: list[float], losses: list[float], mode: str) -> float | None:
    """The rate where the smoothed loss falls fastest against the rate's axis: its logarithm
    for the exponential ramp, as plotted. Lightning's ``suggestion`` takes the slope against
    the rate itself, steepest at the tiny rates of an exponential ramp, where a step of the
    rate is tiny: on configs/sft.yaml it suggested 2.8e-7 for a curve steepest near 2e-3.
    Its skips are kept: the first 10 points (the mean has seen few losses) and the last."""
    points = [(lr, x) for lr, x in list(zip(lrs, losses, strict=True))[10:-1] if math.isfinite(x)]
    if len(points) < 2:
        return None
    rates = torch.tensor([lr for lr, _ in points], dtype=torch.float64)
    axis = rates.log() if mode == "exponential" else rates
    slopes = torch.gradient(
        torch.tensor([x for _, x in points], dtype=torch.float64), spacing=[axis]
    )
    return points[int(slopes[0].argmin())][0]


def write_plot(result: dict[str, Any], path: Path) -> str | None:
    """The loss against the learning rate as a PNG at ``path``; None, with a message, when
    matplotlib is missing."""
    problem = missing_requirements("the lr_find plot (lr_find.png)", packages=("matplotlib",))
    if problem:
        print(f"[lr_find] {problem}; the suggestion and the curve are in lr_find.json")
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(result["lr"], result["loss"], color="tab:blue", alpha=0.3, label="training loss")
    ax.plot(result["lr"], result["smoothed_loss"], color="tab:blue", label="smoothed")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.set_title(f"Learning-rate finder: {result['steps_run']} steps")
    if result["suggestion"] is not None:
        index = min(
            range(len(result["lr"])), key=lambda i: abs(result["lr"][i] - result["suggestion"])
        )
        ax.plot(
            [result["suggestion"]],
            [result["smoothed_loss"][index]],
            "o",
            color="tab:red",
            markersize=9,
            label=f"suggested: {result['suggestion']:.2g}",
        )
    if result["config_lr"]:
        ax.axvline(
            result["config_lr"],
            color="tab:gray",
            linestyle="--",
            label=f"config: {result['config_lr']:.2g}",
        )
    finite = [x for x in result["smoothed_loss"] if math.isfinite(x)]
    if finite:  # a diverged tail would squash the curve: show up to twice the start
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 2 * finite[0]) * 1.05)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path.name


# ---------------------------------------------------------------------- batch-size scaler


def scale_batch_size(cli: Any, options: argparse.Namespace) -> dict[str, Any]:
    """Lightning's batch-size scaler on the CLI's model and data: the largest batch that
    ran, and every size tried."""
    trainer = cli.trainer
    if trainer.world_size > 1:
        raise ConfigError(
            "scale_batch_size runs on one device (the batch size is per device): add "
            "--trainer.devices 1 --trainer.num_nodes 1 --trainer.strategy auto"
        )
    datamodule = cli.datamodule
    if not hasattr(datamodule, "batch_size"):
        raise ConfigError(
            f"scale_batch_size: the data module {type(datamodule).__name__} has no batch_size"
        )
    device = trainer.strategy.root_device.type
    bounded = options.max_trials is None and device != UNBOUNDED_DEVICE
    max_trials = options.max_trials or (OTHER_DEVICE_MAX_TRIALS if bounded else 25)
    config_batch = int(datamodule.batch_size)
    # Lightning builds the first trial's loader before it sets init_val: start there
    datamodule.batch_size = options.init_val
    with search_hooks(cli.model) as seen:
        found = Tuner(trainer).scale_batch_size(
            cli.model,
            datamodule=datamodule,
            mode=options.mode,
            steps_per_trial=options.steps_per_trial,
            init_val=options.init_val,
            max_trials=max_trials,
            batch_arg_name="batch_size",
            margin=options.margin,
            max_val=options.max_val,
        )
    accumulate = int(trainer.accumulate_grad_batches)
    return {
        "batch_size": int(found) if found is not None else None,
        "tried": seen.sizes,
        "peak_memory_gib": seen.peak_memory_gib or None,
        "device": device,
        "bounded": device != UNBOUNDED_DEVICE,
        "max_trials": max_trials,
        "mode": options.mode,
        "steps_per_trial": options.steps_per_trial,
        "config_batch_size": config_batch,
        "val_batch_size": getattr(datamodule, "val_batch_size", None),
        "accumulate_grad_batches": accumulate,
        "config_file": _config_file(cli),
    }


# ------------------------------------------------------------------------ the search hooks


@dataclass
class Seen:
    """What the hooks saw of a search: the batch sizes trained on, the learning-rate finder's
    losses."""

    threshold: float | None = None  # stop once the smoothed loss passes this times its best
    steps: int = 0  # the finder's steps, for its progress lines
    progress: bool = False  # print a progress line now and then (no progress bar)
    sizes: list[int] = field(default_factory=list)  # rows of the first batch of each trial
    peak_memory_gib: dict[int, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # each step's train/loss
    smoothed: list[float] = field(default_factory=list)
    best: float = math.inf
    _average: float = 0.0

    def note_loss(self, loss: float, trainer: pl.Trainer) -> None:
        """Record a step's mean loss, smooth it, and stop the search once it diverges."""
        self.losses.append(loss)
        self._average = BETA * self._average + (1 - BETA) * loss
        smoothed = self._average / (1 - BETA ** len(self.losses))  # debiased: k steps so far
        self.smoothed.append(smoothed)
        if (
            self.threshold is not None
            and len(self.losses) > 1
            and smoothed > self.threshold * self.best
        ):
            trainer.should_stop = True  # the same value on every device: it is reduced
        self.best = min(self.best, smoothed)
        n = len(self.losses)
        if self.progress and trainer.is_global_zero and (n % max(1, self.steps // 10) == 0):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            print(f"[lr_find] step {n}/{self.steps}: lr {lr:.2g}, loss {loss:.4g}", flush=True)


@contextmanager
def search_hooks(
    module: pl.LightningModule, threshold: float | None = None, steps: int = 0
) -> Iterator[Seen]:
    """What a search needs from the module, for its length.

    - The Tuner stops the fit in the first ``on_fit_start`` hook, before the module's own: it
      is run once when training starts instead (it sets up what training needs, e.g. a DPO
      reference, the DeepSpeed loss scaling).
    - Every ``train/loss`` the module logs (once per optimizer step: the mean over the step's
      units and devices) is recorded and smoothed, and stops the search at ``threshold``.
    - The learning-rate finder's progress bar is left out when stderr is not a terminal (a
      log would get a line per step): a progress line every tenth of the steps instead.
    - The row count of the first batch of every trial is recorded (``sizes``), with the peak
      CUDA memory of each (``peak_memory_gib``).
    """
    seen = Seen(threshold=threshold, steps=steps, progress=steps > 0 and not sys.stderr.isatty())
    original_step, original_start, original_log = (
        module.training_step,
        module.on_train_start,
        module.log,
    )
    started = False
    cuda = torch.cuda.is_available()

    def on_train_start() -> None:
        nonlocal started
        if not started:
            started = True
            module.on_fit_start()
        if seen.progress:
            for callback in module.trainer.callbacks:
                if isinstance(callback, _LRCallback):
                    callback.progress_bar_refresh_rate = 0  # it opens no bar then
        original_start()

    def training_step(batch: Any, batch_idx: int) -> Any:
        rows = _rows(batch)
        if rows is not None and batch_idx == 0:  # a trial (or the finder) starts
            _note_peak(seen, cuda and module.device.type == "cuda")
            seen.sizes.append(rows)
        return original_step(batch, batch_idx)

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        original_log(name, value, *args, **kwargs)
        if name == LOSS_TAG:
            seen.note_loss(float(value), module.trainer)

    module.training_step = training_step  # type: ignore[method-assign]
    module.on_train_start = on_train_start  # type: ignore[method-assign]
    module.log = log  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        _note_peak(seen, cuda and module.device.type == "cuda")
        del module.training_step, module.on_train_start, module.log  # the class's own again


def _rows(batch: Any) -> int | None:
    if not isinstance(batch, dict):
        return None
    for key in ("input_ids", "chosen_input_ids"):
        if isinstance(batch.get(key), torch.Tensor):
            return int(batch[key].shape[0])
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), None)
    return int(first.shape[0]) if first is not None else None


def _note_peak(seen: Seen, cuda: bool) -> None:
    """The peak CUDA memory of the batch size trained on until now; the count starts over."""
    if not cuda:
        return
    if seen.sizes:
        peak = torch.cuda.max_memory_allocated() / 2**30
        size = seen.sizes[-1]
        seen.peak_memory_gib[size] = max(seen.peak_memory_gib.get(size, 0.0), peak)
    torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------------- report


def report(result: dict[str, Any], out: Path) -> str:
    """The result in plain words, with the setting to use."""
    if result["command"] == "lr_find":
        return _lr_report(result, out)
    return _batch_report(result, out)


def _lr_report(r: dict[str, Any], out: Path) -> str:
    lines = [
        "",
        f"Learning-rate finder: {r['steps_run']} steps, the learning rate rising "
        f"{r['mode']}ly from {r['min_lr']:.2g} to {r['max_lr']:.2g}.",
    ]
    if r["suggestion"] is not None:
        config = f" (the config has {r['config_lr']:.2g})" if r["config_lr"] else ""
        lines += [
            f"Suggested learning rate: {r['suggestion']:.2g}, where the loss fell fastest"
            f"{config}. To use it:",
            f"    --{LR_KEY} {r['suggestion']:.2g}",
            "It is a starting point: a short range test favours rates a little below the best "
            "peak; confirm with a short run (its diagnosis says whether the rate is too high or "
            "too low).",
        ]
    else:
        lines.append(
            f"No suggestion: {r['steps_run']} steps are too few to find where the loss falls "
            "fastest (at least 13 with a finite loss); raise --num_training, or --max_lr if the "
            "loss never moved."
        )
    if r["lowest"]:
        lines.append(
            f"The smoothed loss was lowest ({r['lowest']['loss']:.4g}) at {r['lowest']['lr']:.2g}."
        )
    if r["stopped_early"] and r["early_stop_threshold"]:
        last = r["lr"][-1] if r["lr"] else r["max_lr"]
        lines.append(
            f"The search stopped early at {last:.2g}: the loss passed "
            f"{r['early_stop_threshold']:g}x its best there (diverging)."
        )
    plot = f"{out / r['plot']}, " if r.get("plot") else ""
    lines.append(f"Written: {plot}{out / 'lr_find.json'}")
    return "\n".join(lines)


def _batch_report(r: dict[str, Any], out: Path) -> str:
    tried = ", ".join(str(s) for s in r["tried"]) or "none"
    lines = [
        "",
        f"Batch-size scaler ({r['mode']} mode, {r['steps_per_trial']} steps per size): sizes "
        f"trained on: {tried}.",
    ]
    size = r["batch_size"]
    if size is None:
        lines.append("No batch size was found: not even the first one ran.")
    else:
        lines += [f"Batch size: {size}. To use it:", f"    --{BATCH_KEY} {size}"]
    if r["bounded"]:
        lines.append(
            f"On a {r['device'].upper()} nothing runs out of memory the way the scaler detects, "
            f"so the search stops after --max_trials ({r['max_trials']}) sizes: {size} is the "
            "largest size tried, not a memory limit. Time is what limits a CPU run."
        )
    if r["peak_memory_gib"]:
        peaks = ", ".join(f"{s}: {g:.1f} GiB" for s, g in sorted(r["peak_memory_gib"].items()))
        lines.append(f"Peak GPU memory by batch size: {peaks}.")
    if size is not None:
        effective = r["config_batch_size"] * r["accumulate_grad_batches"]
        if size != r["config_batch_size"]:
            accumulate = max(1, round(effective / size))
            lines.append(
                f"The config trains {effective} rows per optimizer step and device "
                f"(batch_size {r['config_batch_size']} x accumulate_grad_batches "
                f"{r['accumulate_grad_batches']}); to keep about that many with {size}: "
                f"--trainer.accumulate_grad_batches {accumulate}."
            )
        if r["val_batch_size"] is not None:
            lines.append(
                f"Validation batches keep their own size (data.val_batch_size "
                f"{r['val_batch_size']}): the search trains, it does not validate."
            )
    lines.append(f"Written: {out / 'scale_batch_size.json'}")
    return "\n".join(lines)


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _config_file(cli: Any) -> str | None:
    configs = cli.config.get("config") or []
    return str(configs[0]) if configs else None


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


__all__ = ["TUNE_COMMANDS", "build", "lr_find", "main", "report", "scale_batch_size", "search_dir"]
