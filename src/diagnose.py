"""What a run's curves show, in plain words, with the evidence and what to try.

    python -m src.diagnose runs/sft/version_0     # or runs/sft: its newest version

reads the run's TensorBoard curves (``train/loss``, ``val/loss``, ``train/grad_norm``,
``train/padding_efficiency``, the learning rate), its ``config.yaml`` and the names of its
checkpoints, prints the diagnosis and writes it to ``diagnosis.md`` in the run. The
``src.callbacks.Diagnosis`` callback does the same at the end of every fit.

What is looked for: a training loss that diverges (rises above where it started, climbs back
after falling, becomes NaN) or spikes, with the steps where the gradient norm jumped; one that
stays flat or falls too slowly; a validation loss that rises while the training loss falls
(over-fitting: from which step, and which checkpoint holds the best weights); a large gap
between the two at the start (data that differ); low padding efficiency. A run with none of
these is said to look healthy. :func:`diagnose` works on :class:`Curves` alone, so each case
can be checked on synthetic curves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import yaml

DIAGNOSIS_FILENAME = "diagnosis.md"

# ------------------------------------------------------------------------------ thresholds
# Fewer logged training losses than this say nothing about a trend.
MIN_POINTS = 5
ZERO_STD_HIGH = 0.5  # groups with equal rewards above which the run learns from few of them
# The start and end levels of a curve are medians over its first and last fifth (at most
# EDGE_MAX_POINTS values): one noisy batch must not decide the verdict.
EDGE_FRACTION = 0.2
EDGE_MAX_POINTS = 10
# Ending 25% above the first logged loss: training made the model worse. Batch-to-batch noise
# of a healthy run stays far below this, and a healthy run ends well below its start.
DIVERGE_RISE = 0.25
# Ending 50% above the lowest level reached: it learnt, then blew up (too high a peak
# learning rate, or a warmup too short). Over-fitting never raises the training loss.
REBOUND_RISE = 0.5
# Less than a 2% drop from start to end: the weights barely moved.
FLAT_DROP = 0.02
# Less than a 10% drop while still falling at the end (by STILL_FALLING over the last third):
# the run ends long before it converges. A plateau at a small drop is left alone: fine-tuning
# an already trained model can start close to its final loss.
SLOW_DROP = 0.10
STILL_FALLING = 0.01
# A loss that has not fallen by half and fell at least STEADY_SHARE of what a straight line
# would have in the last third of the run has not begun to level off: a healthy curve falls
# fastest first (an exponential decay over the run: 0.2 of the straight line's share). The
# demo from scratch at lr 1e-6 falls 11% in 150 steps at 0.83 of it; at 1e-3 it halves in 50.
STEADY_SHARE = 0.6
STEADY_MAX_DROP = 0.5
# A spike is a value this many times the median of the SPIKE_WINDOW values before it (and at
# least SPIKE_HISTORY of them): losses of healthy batches stay within a few tens of percent of
# each other; gradient norms swing more, so their bar is higher. A training loss whose level
# rises DIVERGE_RISE above where it started and then falls again overshot in its first steps.
SPIKE_WINDOW = 10
SPIKE_HISTORY = 2
LOSS_SPIKE = 1.5
GRAD_SPIKE = 3.0
# Validation loss 3% above its best, at OVERFIT_MIN_AFTER validations in a row after it, all
# above the best: a fixed validation set is not noisy enough to do that by chance.
OVERFIT_RISE = 0.03
OVERFIT_MIN_AFTER = 2
# At the first validation the training and validation losses come from the same weights; a
# 25% difference then means the two sets are not the same kind of data. A training loss
# logged up to START_MAX_STEPS steps later is compared only where learning cannot explain
# the gap (the training loss is the higher one): ten updates at a high rate already take a
# model from scratch from 7.1 to 4.7 on the demo data.
START_GAP = 0.25
START_MAX_STEPS = 10
# Below 70% real tokens per token slot, packing would save at least 30% of the compute.
PADDING_LOW = 0.7
# Steps named in one sentence; the evidence holds them all.
MAX_LISTED = 6

LR_KEY = "model.init_args.optimizer.init_args.lr"
WEIGHT_DECAY_KEY = "model.init_args.optimizer.init_args.weight_decay"
SEVERITY_ORDER = {"problem": 0, "warning": 1, "note": 2, "ok": 3}


class DiagnosisError(ValueError):
    """A directory that holds no run to diagnose."""


# ----------------------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class Series:
    """One logged curve: steps and values in step order (one value per step)."""

    steps: tuple[int, ...] = ()
    values: tuple[float, ...] = ()

    @classmethod
    def of(cls, points: list[tuple[int, float]] | None) -> Series:
        """A series from ``(step, value)`` pairs; for a step logged twice the last value."""
        by_step = {int(s): float(v) for s, v in points or []}
        steps = sorted(by_step)
        return cls(tuple(steps), tuple(by_step[s] for s in steps))

    def __len__(self) -> int:
        return len(self.steps)

    def finite(self) -> Series:
        kept = [(s, v) for s, v in zip(self.steps, self.values, strict=True) if math.isfinite(v)]
        return Series(tuple(s for s, _ in kept), tuple(v for _, v in kept))

    def at(self, step: int) -> float | None:
        """The value logged at ``step`` or, failing that, the last one before it."""
        found = None
        for s, v in zip(self.steps, self.values, strict=True):
            if s > step:
                break
            found = v
        return found


@dataclass(frozen=True)
class Settings:
    """What ``config.yaml`` (and ``run.json``) say about the run, where they say it."""

    lr: float | None = None
    weight_decay: float | None = None
    warmup: float | None = None
    gradient_clip_val: float | None = None
    packing: bool | None = None
    max_steps: int | None = None
    config_file: str | None = None  # the --config the run was started with


@dataclass(frozen=True)
class Curves:
    """Everything :func:`diagnose` reads: the curves, the checkpoints' names and settings."""

    train_loss: Series = field(default_factory=Series)
    val_loss: Series = field(default_factory=Series)
    grad_norm: Series = field(default_factory=Series)
    padding_efficiency: Series = field(default_factory=Series)
    lr: Series = field(default_factory=Series)
    epoch: Series = field(default_factory=Series)
    skipped_steps: Series = field(default_factory=Series)
    train_reward: Series = field(default_factory=Series)  # a reward-maximising run's (GRPO)
    val_reward: Series = field(default_factory=Series)
    zero_std: Series = field(default_factory=Series)  # share of groups with equal rewards
    checkpoints: tuple[str, ...] = ()  # file names under checkpoints/
    settings: Settings = field(default_factory=Settings)
    stopped: str | None = None  # why the fit ended early, when it did (a divergence)

    @classmethod
    def of(
        cls,
        scalars: dict[str, list[tuple[int, float]]],
        checkpoints: list[str] | tuple[str, ...] = (),
        settings: Settings | None = None,
        stopped: str | None = None,
    ) -> Curves:
        """Curves from logged scalars by name, as TensorBoard holds them."""
        return cls(
            train_loss=Series.of(scalars.get("train/loss")),
            val_loss=Series.of(scalars.get("val/loss")),
            grad_norm=Series.of(scalars.get("train/grad_norm")),
            padding_efficiency=Series.of(
                scalars.get("train/padding_efficiency")
                or scalars.get("train/padding_efficiency_avg")
            ),
            lr=Series.of(scalars.get(lr_tag(scalars))),
            epoch=Series.of(scalars.get("train/epoch") or scalars.get("epoch")),
            skipped_steps=Series.of(scalars.get("train/skipped_steps")),
            train_reward=Series.of(scalars.get("train/reward")),
            val_reward=Series.of(scalars.get("val/reward")),
            zero_std=Series.of(scalars.get("train/frac_reward_zero_std")),
            checkpoints=tuple(checkpoints),
            settings=settings or Settings(),
            stopped=stopped,
        )


def lr_tag(tags: dict[str, Any] | list[str]) -> str | None:
    """The learning-rate curve's name: ``train/lr`` (of the first parameter group where it
    has several), else Lightning's ``LearningRateMonitor`` names (``lr-AdamW``,
    ``lr-AdamW/pg1``)."""
    names = sorted(tags)
    for name in names:
        if name == "train/lr" or name.startswith("train/lr/"):
            return name
    return next((n for n in names if n.startswith("lr-")), None)


@dataclass(frozen=True)
class Finding:
    """One thing the curves show.

    Attributes:
        kind: ``diverging``, ``spikes``, ``flat``, ``slow``, ``overfitting``, ``start_gap``,
            ``padding``, ``too_short``, ``healthy`` or ``reward`` (a reward-maximising run).
        severity: ``problem``, ``warning``, ``note`` or ``ok``.
        title: A heading.
        message: What the curves show, in plain words, with the numbers.
        evidence: The numbers and steps behind the message.
        advice: What to try, each with the setting to change where there is one.
    """

    kind: str
    severity: str
    title: str
    message: str
    evidence: dict[str, Any]
    advice: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ diagnosis


def diagnose(curves: Curves) -> list[Finding]:
    """What ``curves`` show, the most serious first; a healthy run says so."""
    findings: list[Finding] = []
    if len(curves.train_reward.finite()):
        return [_reward_run(curves)]  # a policy-gradient loss is no learning curve
    train = curves.train_loss
    if len(train.finite()) < MIN_POINTS:
        findings.append(_too_short(curves))
    else:
        diverged = _divergence(curves)
        if diverged is not None:
            findings.append(diverged)
        else:
            findings += [f for f in (_spikes(curves), _flat_or_slow(curves)) if f is not None]
        findings += [f for f in (_overfitting(curves),) if f is not None]
        if diverged is None:  # a diverging loss is far from the validation's at any step
            findings += [f for f in (_start_gap(curves),) if f is not None]
    padding = _padding(curves)
    if padding is not None:
        findings.append(padding)
    if len(train.finite()) >= MIN_POINTS and not any(
        f.severity in ("problem", "warning") for f in findings
    ):
        findings.append(_healthy(curves))
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])


def _edge(n: int) -> int:
    return max(1, min(EDGE_MAX_POINTS, round(n * EDGE_FRACTION)))


def _levels(values: tuple[float, ...]) -> list[float]:
    """Trailing medians over an edge's worth of points: the curve without its batch noise."""
    k = _edge(len(values))
    return [median(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def _too_short(curves: Curves) -> Finding:
    n = len(curves.train_loss.finite())
    return Finding(
        "too_short",
        "note",
        "Too few points to judge the training curve",
        f"Only {n} training-loss value{'s' if n != 1 else ''} "
        f"{'was' if n == 1 else 'were'} logged; at least {MIN_POINTS} are needed to see a trend.",
        {"train_loss_points": n},
        (
            "Log more often (`--trainer.log_every_n_steps 1`) or train for longer "
            "(`--trainer.max_steps`).",
        ),
    )


def _divergence(curves: Curves) -> Finding | None:
    train = curves.train_loss
    bad = [s for s, v in zip(train.steps, train.values, strict=True) if not math.isfinite(v)]
    finite = train.finite()
    values, steps = finite.values, finite.steps
    k = _edge(len(values))
    start, end = values[0], median(values[-k:])
    levels = _levels(values)
    low_index = min(range(k - 1, len(levels)), key=levels.__getitem__)
    low, low_step = levels[low_index], steps[low_index]
    evidence: dict[str, Any] = {
        "loss_start": start,
        "loss_start_step": steps[0],
        "loss_end": end,
        "loss_low": low,
        "loss_low_step": low_step,
        "last_step": steps[-1],
    }
    sentences = []
    if curves.stopped:
        sentences.append(f"The fit was stopped: {curves.stopped}.")
        evidence["stopped"] = curves.stopped
    if bad:
        evidence["nonfinite_steps"] = bad
        sentences.append(f"The training loss became NaN or infinite at {_steps(bad)}.")
    if end > start * (1 + DIVERGE_RISE):
        over = start * (1 + DIVERGE_RISE)
        rise_step = next(s for s, v in zip(steps, values, strict=True) if v > over)
        evidence["rise_step"] = rise_step
        sentences.append(
            f"The training loss rose instead of falling: it began at {_n(start)} "
            f"(step {steps[0]}) and ended at {_n(end)} (the median of the last {k} logged "
            f"values), {end / start:.1f}x higher; it first went above {_n(over)} at step "
            f"{rise_step}."
        )
    elif end > low * (1 + REBOUND_RISE) and low_index < len(values) - k:
        over = low * (1 + REBOUND_RISE)
        rise_step = next(
            s for s, v in zip(steps[low_index:], levels[low_index:], strict=True) if v > over
        )
        evidence["rise_step"] = rise_step
        sentences.append(
            f"The training loss fell to {_n(low)} by step {low_step}, then climbed back to "
            f"{_n(end)} at the end (+{end / low - 1:.0%}), above {_n(over)} from step "
            f"{rise_step} on."
        )
    elif not bad and not curves.stopped:
        return None
    grads = curves.grad_norm.finite()
    jumps = _jumps(grads, GRAD_SPIKE)
    if jumps:
        evidence["grad_norm_spikes"] = jumps
        sentences.append(f"The gradient norm jumped at {_jump_text(jumps, curves.lr)}.")
    if len(grads) >= 2:
        peak = max(range(len(grads)), key=grads.values.__getitem__)
        first, top = grads.values[0], grads.values[peak]
        if first > 0 and top >= GRAD_SPIKE * first:
            cross = next(
                s for s, v in zip(grads.steps, grads.values, strict=True) if v >= GRAD_SPIKE * first
            )
            evidence["grad_norm_first"] = first
            evidence["grad_norm_above_step"] = cross
            evidence["grad_norm_peak"] = {"step": grads.steps[peak], "value": top}
            sentences.append(
                f"The gradient norm was {_n(first)} at step {grads.steps[0]}, above "
                f"{GRAD_SPIKE:g}x that from step {cross}, and peaked at {_n(top)} at step "
                f"{grads.steps[peak]}."
            )
    s = curves.settings
    advice = [_lower_lr(s)]
    if s.warmup is not None:
        advice.append(
            f"Warm up for longer (now {_n(s.warmup)}): e.g. `--model.init_args.warmup "
            f"{_longer_warmup(s)}`, so the learning rate reaches its peak after the first "
            "large gradients."
        )
    if not s.gradient_clip_val:
        advice.append("Clip the gradient norm: `--trainer.gradient_clip_val 1.0`.")
    return Finding(
        "diverging",
        "problem",
        "Training diverged: the learning rate is probably too high",
        " ".join(sentences),
        evidence,
        tuple(advice),
    )


def _jumps(series: Series, ratio: float) -> list[dict[str, float]]:
    """The points of ``series`` at least ``ratio`` times the median of those before them."""
    found = []
    values = series.values
    for i in range(SPIKE_HISTORY, len(values)):
        before = median(values[max(0, i - SPIKE_WINDOW) : i])
        if before > 0 and values[i] >= ratio * before:
            found.append({"step": series.steps[i], "value": values[i], "ratio": values[i] / before})
    return found


def _jump_text(jumps: list[dict[str, float]], lr: Series) -> str:
    parts = []
    for jump in jumps[:MAX_LISTED]:
        rate = lr.at(int(jump["step"]))
        at_lr = f"; learning rate {_lr(rate)}" if rate is not None else ""
        parts.append(
            f"step {jump['step']} ({_n(jump['value'])}, {jump['ratio']:.1f}x the level "
            f"before{at_lr})"
        )
    more = f" and {len(jumps) - MAX_LISTED} more" if len(jumps) > MAX_LISTED else ""
    return ", ".join(parts) + more


def _spikes(curves: Curves) -> Finding | None:
    train = curves.train_loss.finite()
    losses = _jumps(train, LOSS_SPIKE)
    grads = _jumps(curves.grad_norm.finite(), GRAD_SPIKE)
    levels = _levels(train.values)
    top = max(range(len(levels)), key=levels.__getitem__)
    overshoot = levels[top] > train.values[0] * (1 + DIVERGE_RISE)
    if not losses and not grads and not overshoot:
        return None
    sentences = []
    if overshoot:
        sentences.append(
            f"The training loss first rose, from {_n(train.values[0])} (step {train.steps[0]}) "
            f"to a level of {_n(levels[top])} around step {train.steps[top]}, before it fell: "
            "the first updates overshot."
        )
    if losses:
        sentences.append(
            f"The training loss jumped at {_jump_text(losses, curves.lr)}, and came back down."
        )
    if grads:
        sentences.append(f"The gradient norm jumped at {_jump_text(grads, curves.lr)}.")
    s = curves.settings
    advice = [
        "If the spikes come with a high learning rate, or right where the warmup ends: "
        + _lower_lr(s, lowercase=True),
        "Look at the batches of those steps (`python -m src.preview --config ...`): a corrupt, "
        "very long or very different example makes a single spike.",
    ]
    if not s.gradient_clip_val:
        advice.append("Clip the gradient norm: `--trainer.gradient_clip_val 1.0`.")
    return Finding(
        "spikes",
        "warning",
        "Unstable training: the loss or the gradient norm spiked",
        " ".join(sentences),
        {
            "loss_spikes": losses,
            "grad_norm_spikes": grads,
            "overshoot": {"step": train.steps[top], "level": levels[top]} if overshoot else None,
        },
        tuple(advice),
    )


def _flat_or_slow(curves: Curves) -> Finding | None:
    finite = curves.train_loss.finite()
    values, steps = finite.values, finite.steps
    k = _edge(len(values))
    start, end = median(values[:k]), median(values[-k:])
    if start <= 0:
        return None
    drop = (start - end) / start
    span = steps[-1] - steps[0]
    evidence = {
        "loss_start": start,
        "loss_end": end,
        "drop": drop,
        "first_step": steps[0],
        "last_step": steps[-1],
    }
    s = curves.settings
    if drop < FLAT_DROP:
        advice = [_raise_lr(s, 10), _lr_find_line(s)]
        advice.append(
            "If it stays flat at a sensible learning rate, check that something is trained: "
            "labels that are not all -100 (`python -m src.preview` marks the trained tokens), "
            "parameters that are not all frozen, a warmup shorter than the run"
            + (
                f" (now {_n(s.warmup)} of {s.max_steps} steps)."
                if s.warmup and s.max_steps
                else "."
            )
        )
        return Finding(
            "flat",
            "problem",
            "The training loss is flat: the learning rate may be too low",
            f"The training loss barely moved over {span} steps: {_n(start)} at the start and "
            f"{_n(end)} at the end (medians of the first and last {k} logged values), a "
            f"{abs(drop):.1%} {'drop' if drop >= 0 else 'rise'}.",
            evidence,
            tuple(advice),
        )
    first = len(values) * 2 // 3 - k // 2
    third = values[first : len(values) * 2 // 3 + (k + 1) // 2]
    before_last_third = median(third) if third else start
    late_drop = (before_last_third - end) / start
    evidence["late_drop"] = late_drop
    # the share of the drop a straight line makes between the medians' centres
    centre = (k - 1) / 2
    line_share = (len(values) - 1 - centre - (first + centre)) / (len(values) - 1 - 2 * centre)
    steady = drop < STEADY_MAX_DROP and late_drop >= STEADY_SHARE * line_share * drop
    if steady and not (drop < SLOW_DROP and late_drop >= STILL_FALLING):
        return Finding(
            "slow",
            "warning",
            "The training loss falls at a steady pace: the learning rate may be too low",
            f"The training loss fell {drop:.1%} over {span} steps (from {_n(start)} to "
            f"{_n(end)}), {late_drop / drop:.0%} of that in its last third (a straight line: "
            f"{line_share:.0%}): it falls about as fast at the end as at the start and has not "
            "begun to level off, as a curve does once the learning rate is high enough to make "
            "progress.",
            evidence,
            (
                _raise_lr(s, 10),
                _lr_find_line(s),
                "Or train for longer"
                + (f" (now {s.max_steps} steps)" if s.max_steps else "")
                + ", if the rate is known to be right for this model.",
            ),
        )
    if drop < SLOW_DROP and late_drop >= STILL_FALLING:
        return Finding(
            "slow",
            "warning",
            "The training loss falls slowly",
            f"The training loss fell only {drop:.1%} over {span} steps (from {_n(start)} to "
            f"{_n(end)}) and was still falling at the end ({late_drop:.1%} of its start over "
            "the last third): the run ends long before it converges.",
            evidence,
            (
                _raise_lr(s, 3),
                _lr_find_line(s),
                "Or train for longer"
                + (f" (now {s.max_steps} steps)." if s.max_steps else ".")
                + " When fine-tuning an already trained model a small drop can be normal: "
                "judge it by the validation loss.",
            ),
        )
    return None


def _overfitting(curves: Curves) -> Finding | None:
    val = curves.val_loss.finite()
    if len(val) < 1 + OVERFIT_MIN_AFTER:
        return None
    best_index = min(range(len(val)), key=val.values.__getitem__)
    best, best_step = val.values[best_index], val.steps[best_index]
    after = val.values[best_index + 1 :]
    last, last_step = val.values[-1], val.steps[-1]
    if len(after) < OVERFIT_MIN_AFTER or last < best * (1 + OVERFIT_RISE):
        return None
    train = curves.train_loss.finite()
    train_at_best = _train_level(train, best_step)
    train_end = median(train.values[-_edge(len(train)) :]) if len(train) else None
    if train_at_best is None or train_end is None or train_end >= train_at_best:
        return None  # both rising: a divergence, not over-fitting
    epoch = curves.epoch.at(best_step)
    checkpoint = best_checkpoint(curves.checkpoints, best_step)
    evidence = {
        "best_step": best_step,
        "best_val_loss": best,
        "last_step": last_step,
        "last_val_loss": last,
        "train_loss_at_best": train_at_best,
        "train_loss_end": train_end,
        "epoch_at_best": epoch,
        "best_checkpoint": checkpoint,
    }
    in_epoch = f" (epoch {int(epoch)})" if epoch is not None else ""
    message = (
        f"The validation loss was lowest at step {best_step}{in_epoch}, {_n(best)}, and rose "
        f"to {_n(last)} by step {last_step} (+{last / best - 1:.1%}), while the training loss "
        f"kept falling, from {_n(train_at_best)} around step {best_step} to {_n(train_end)} at "
        f"the end: the model learns the training examples rather than the task from step "
        f"{best_step} on."
    )
    s = curves.settings
    if checkpoint:
        keep = f"The best weights are those of step {best_step}: `checkpoints/{checkpoint}`."
    else:
        keep = (
            f"No checkpoint holds the weights of step {best_step}; next time keep the best one: "
            "`--best.save_top_k 1` (and `--best.export true` to export it to hf/)."
        )
    wd = f" (now {_n(s.weight_decay)})" if s.weight_decay is not None else ""
    advice = (
        keep,
        f"Stop earlier: `--trainer.max_steps {best_step + 1}`, or let early stopping do it: "
        "`--early_stopping.patience 3`.",
        f"Regularise: more weight decay{wd}, e.g. `--{WEIGHT_DECAY_KEY} 0.1`; or fewer "
        "trainable parameters (LoRA, a lower rank).",
        "More data, or fewer passes over it"
        + (f" (the best was in epoch {int(epoch)})." if epoch is not None else "."),
    )
    return Finding(
        "overfitting",
        "problem",
        f"Over-fitting from step {best_step}: the validation loss rises while the training "
        "loss falls",
        message,
        evidence,
        advice,
    )


def _train_level(train: Series, step: int) -> float | None:
    """The training loss around ``step``: the median of the edge's worth of points ending
    there (at least the first point)."""
    upto = [v for s, v in zip(train.steps, train.values, strict=True) if s <= step]
    if not upto:
        return train.values[0] if len(train) else None
    return median(upto[-_edge(len(train)) :])


def best_checkpoint(names: tuple[str, ...] | list[str], step: int) -> str | None:
    """The checkpoint holding the weights validated at logged step ``step``.

    A checkpoint named ``step=G`` (or ``best-step=G-...``) holds the weights after G optimizer
    steps; their validation is logged at step G - 1, since Lightning logs an optimizer step's
    metrics before counting it. The validation of step 0 (before any update) has no such file.
    A ``best-*`` file of that step comes first.
    """
    if step <= 0:
        return None
    found = [n for n in names if checkpoint_step(n) == step + 1]
    return sorted(found, key=lambda n: (not n.startswith("best"), n))[0] if found else None


def checkpoint_step(name: str) -> int | None:
    """G of a ``step=G.ckpt`` or ``best-step=G-val_loss=X.ckpt`` file name."""
    match = re.search(r"(?:^|-)step=(\d+)", name)
    return int(match.group(1)) if match else None


def _start_gap(curves: Curves) -> Finding | None:
    val, train = curves.val_loss.finite(), curves.train_loss.finite()
    if not len(val) or not len(train):
        return None
    val_step, val_first = val.steps[0], val.values[0]
    near = [
        (s, v)
        for s, v in zip(train.steps, train.values, strict=True)
        if abs(s - val_step) <= START_MAX_STEPS
    ]
    if not near:
        return None
    train_step, train_first = min(near, key=lambda p: abs(p[0] - val_step))
    low = min(train_first, val_first)
    if low <= 0 or abs(val_first - train_first) / low < START_GAP:
        return None
    if val_first > train_first and train_step > val_step:
        return None  # the updates between may have lowered the training loss that much
    gap = abs(val_first - train_first) / low
    higher = "validation" if val_first > train_first else "training"
    return Finding(
        "start_gap",
        "warning",
        "A large gap between training and validation loss at the start: do the data match?",
        f"At the start the model scored {_n(train_first)} on the training data (step "
        f"{train_step}) and {_n(val_first)} on the validation data (step {val_step}): the "
        f"{higher} loss is {gap:.0%} higher. Before training has changed much, the same weights "
        "should score both sets alike; a gap this large means they differ (another format, "
        "chat template, language, length, or share of trained tokens).",
        {
            "train_loss": train_first,
            "train_step": train_step,
            "val_loss": val_first,
            "val_step": val_step,
            "gap": gap,
        },
        (
            "Compare the two sets: `python -m src.preview --config ...` and again with "
            "`--split val`.",
            "If the validation set is meant to differ (another task), read its loss as "
            "transfer, not as over-fitting.",
        ),
    )


def _padding(curves: Curves) -> Finding | None:
    values = curves.padding_efficiency.finite().values
    if not values:
        return None
    mean = sum(values) / len(values)
    if mean >= PADDING_LOW:
        return None
    packing = curves.settings.packing
    if packing:
        advice = (
            "Packing is on, yet rows stay mostly empty: the data may be too small for the "
            "rows (a lower `--data.init_args.max_length`) or the documents too few per batch.",
        )
    else:
        advice = (
            "Pack the rows: `--data.init_args.packing true` fills each row with several "
            "examples (documents kept apart: each attends to itself only).",
            "Or make the rows shorter (`--data.init_args.max_length`) if few examples are long.",
        )
    return Finding(
        "padding",
        "note",
        f"Low padding efficiency: {1 - mean:.0%} of the token slots are padding",
        f"On average only {mean:.0%} of the token slots of a batch held real tokens "
        f"(train/padding_efficiency over {len(values)} steps): about "
        f"{1 - mean:.0%} of the compute went into padding.",
        {"mean": mean, "min": min(values), "points": len(values), "packing": packing},
        advice,
    )


def _healthy(curves: Curves) -> Finding:
    train = curves.train_loss.finite()
    k = _edge(len(train))
    start, end = median(train.values[:k]), median(train.values[-k:])
    evidence: dict[str, Any] = {
        "loss_start": start,
        "loss_end": end,
        "first_step": train.steps[0],
        "last_step": train.steps[-1],
    }
    message = (
        f"The training loss fell from {_n(start)} to {_n(end)} ({(end - start) / start:+.0%}) "
        f"over {train.steps[-1] - train.steps[0]} steps without spikes"
    )
    advice: list[str] = []
    val = curves.val_loss.finite()
    if len(val) >= 2:
        evidence.update(val_start=val.values[0], val_end=val.values[-1])
        message += f"; the validation loss went from {_n(val.values[0])} to {_n(val.values[-1])}"
        best = min(val.values)
        if val.values[-1] <= best * (1 + OVERFIT_RISE):
            message += f" and was at its best at the last validation (step {val.steps[-1]})"
            if val.values[-2] - val.values[-1] > STILL_FALLING * val.values[-2]:
                advice.append(
                    "The validation loss was still falling at the end: a longer run should help."
                )
    else:
        message += "; no validation loss was logged to compare it with"
    return Finding("healthy", "ok", "The run looks healthy", message + ".", evidence, tuple(advice))


def _reward_run(curves: Curves) -> Finding:
    """A run that maximises a reward (GRPO): its loss is a surrogate whose value stays near 0
    whatever is learnt, so the reward is read instead."""
    evidence: dict[str, Any] = {}
    parts = [
        "This run maximises a reward: its loss is a policy-gradient surrogate near 0 whatever "
        "is learnt, so the loss curve is not diagnosed and the reward is read instead"
    ]
    val, train = curves.val_reward.finite(), curves.train_reward.finite()
    rose = None
    if len(val) >= 2:
        best = max(range(len(val)), key=lambda i: val.values[i])
        evidence.update(val_start=val.values[0], val_end=val.values[-1], val_best=val.values[best])
        rose = val.values[-1] > val.values[0]
        parts.append(
            f"the validation reward went from {_n(val.values[0])} (step {val.steps[0]}) to "
            f"{_n(val.values[-1])} (step {val.steps[-1]}), its best {_n(val.values[best])} at "
            f"step {val.steps[best]}"
        )
    if len(train) >= 2:
        k = _edge(len(train))
        start, end = median(train.values[:k]), median(train.values[-k:])
        evidence.update(train_start=start, train_end=end)
        rose = end > start if rose is None else rose
        parts.append(f"the training reward went from {_n(start)} to {_n(end)} (medians)")
    advice: list[str] = []
    zero = curves.zero_std.finite()
    if len(zero):
        share = median(zero.values)
        evidence["zero_std"] = share
        if share > ZERO_STD_HIGH:
            parts.append(
                f"in {share:.0%} of the groups (median) every completion got the same reward, "
                "and such a group has advantage 0: it teaches nothing"
            )
            advice.append(
                "Give the groups more spread: more completions per prompt "
                "(`--model.init_args.num_generations`), a higher sampling temperature "
                "(`--model.init_args.temperature`), or prompts of the difficulty the model "
                "gets right some of the time."
            )
    if rose is False:
        advice.append(
            "The reward did not rise: check the reward functions on a few completions (the "
            "`completions` table in TensorBoard), then the learning rate."
        )
    severity, title = ("ok", "The reward rose") if rose else ("warning", "The reward did not rise")
    if rose is None:
        severity, title = "note", "Too few reward values to say how it went"
    return Finding("reward", severity, title, "; ".join(parts) + ".", evidence, tuple(advice))


# --------------------------------------------------------------------------------- advice


def _lower_lr(s: Settings, lowercase: bool = False) -> str:
    text = "Lower the learning rate"
    if s.lr:
        text += f" (now {_lr(s.lr)}): try {_lr(s.lr / 10)}, `--{LR_KEY} {_lr(s.lr / 10)}`,"
    text += " or let the learning-rate finder suggest one: " + _lr_find_command(s) + "."
    return text[0].lower() + text[1:] if lowercase else text


def _raise_lr(s: Settings, factor: int) -> str:
    if s.lr:
        return (
            f"Raise the learning rate (now {_lr(s.lr)}): try {_lr(s.lr * factor)}, "
            f"`--{LR_KEY} {_lr(s.lr * factor)}`."
        )
    return f"Raise the learning rate (`--{LR_KEY}`), e.g. {factor}x."


def _lr_find_line(s: Settings) -> str:
    return f"Or let the learning-rate finder suggest one: {_lr_find_command(s)}."


def _lr_find_command(s: Settings) -> str:
    return f"`python train.py lr_find --config {s.config_file or 'CONFIG'}`"


def _longer_warmup(s: Settings) -> str:
    if s.warmup is not None and 0 < s.warmup < 1:  # a fraction of the run
        return _n(min(0.2, s.warmup * 2))
    if s.warmup:
        return str(int(s.warmup * 2))
    return str(max(10, (s.max_steps or 1000) // 20))


def _steps(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:MAX_LISTED])
    more = f" and {len(steps) - MAX_LISTED} more" if len(steps) > MAX_LISTED else ""
    return f"step{'s' if len(steps) > 1 else ''} {shown}{more}"


def _n(value: float) -> str:
    return f"{value:.4g}"


def _lr(value: float | None) -> str:
    return "?" if value is None else f"{value:.2g}"


# ------------------------------------------------------------------------------ rendering


def render_markdown(findings: list[Finding], curves: Curves, run: str | Path | None = None) -> str:
    """The diagnosis as Markdown (for ``diagnosis.md``, the terminal and TensorBoard)."""
    train, val = curves.train_loss, curves.val_loss if len(curves.val_loss) else curves.val_reward
    lines = [f"# Diagnosis of {run}" if run else "# Diagnosis", ""]
    facts = []
    if len(train):
        facts.append(f"steps {train.steps[0]}-{train.steps[-1]}")
        facts.append(f"{len(train)} training-loss values")
    facts.append(f"{len(val)} validation{'s' if len(val) != 1 else ''}")
    rate = curves.settings.lr
    if rate is None and len(curves.lr):
        rate = max(curves.lr.values)
    if rate is not None:
        facts.append(f"learning rate {_lr(rate)}")
    lines += [", ".join(facts).capitalize() + ".", ""]
    for finding in findings:
        lines += [f"## {finding.title}", "", finding.message, ""]
        if finding.advice:
            lines += ["What to try:", ""] + [f"- {a}" for a in finding.advice] + [""]
        lines += [f"Evidence: `{_evidence_text(finding.evidence)}`", ""]
    return "\n".join(lines).rstrip() + "\n"


def _evidence_text(evidence: dict[str, Any]) -> str:
    return json.dumps(_rounded(evidence), separators=(", ", ": "))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


# -------------------------------------------------------------------------------- reading


def find_run(path: str | Path) -> Path:
    """The run directory ``path`` names: itself when it holds event files, else its newest
    ``version_N``. Raises ``DiagnosisError`` for a directory with no curves."""
    path = Path(path)
    if not path.is_dir():
        raise DiagnosisError(f"no run directory {path}")
    if any(path.glob("events.out.tfevents.*")):
        return path
    versions = [p for p in path.glob("version_*") if p.name[8:].isdigit() and p.is_dir()]
    versions = [p for p in versions if any(p.glob("events.out.tfevents.*"))]
    if versions:
        return max(versions, key=lambda p: int(p.name[8:]))
    raise DiagnosisError(
        f"no training curves in {path}: it holds no TensorBoard event files "
        "(events.out.tfevents.*); give a run directory such as runs/sft/version_0"
    )


def read_scalars(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files (a resumed run has several): ``tag -> [(step,
    value)]``, in the order written, so a step logged again after a resume comes last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: dict[str, list[tuple[float, int, float]]] = {}
    for path in sorted(Path(run).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            events.setdefault(tag, []).extend(
                (e.wall_time, e.step, e.value) for e in accumulator.Scalars(tag)
            )
    return {tag: [(s, v) for _, s, v in sorted(points)] for tag, points in events.items()}


def read_settings(run: str | Path) -> Settings:
    """The settings a diagnosis names, from the run's ``config.yaml`` and ``run.json``."""
    run = Path(run)
    config: dict[str, Any] = {}
    with contextlib.suppress(OSError, yaml.YAMLError):
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    config_file = None
    try:
        args = json.loads((run / "run.json").read_text(encoding="utf-8")).get("args") or []
        config_file = next(
            (b for a, b in zip(args, args[1:], strict=False) if a == "--config"), None
        )
    except (OSError, ValueError, AttributeError):
        pass

    def get(key: str) -> Any:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def number(key: str) -> float | None:
        value = get(key)
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    max_steps = number("trainer.max_steps")
    packing = get("data.init_args.packing")
    return Settings(
        lr=number(LR_KEY),
        weight_decay=number(WEIGHT_DECAY_KEY),
        warmup=number("model.init_args.warmup"),
        gradient_clip_val=number("trainer.gradient_clip_val"),
        packing=packing if isinstance(packing, bool) else None,
        max_steps=int(max_steps) if max_steps is not None and max_steps > 0 else None,
        config_file=config_file,
    )


def read_run(run: str | Path, stopped: str | None = None) -> Curves:
    """A run directory's curves, checkpoints and settings. Raises ``DiagnosisError`` when its
    event files hold no training loss."""
    run = Path(run)
    scalars = read_scalars(run)
    if not scalars.get("train/loss"):
        raise DiagnosisError(
            f"no training curves in {run}: its event files hold no train/loss (a run that "
            "stopped before its first logged step, or not a training run)"
        )
    directory = run / "checkpoints"
    checkpoints = sorted(p.name for p in directory.glob("*.ckpt")) if directory.is_dir() else []
    return Curves.of(scalars, checkpoints, read_settings(run), stopped)


def diagnose_run(
    run: str | Path, write: bool = True, stopped: str | None = None
) -> tuple[str, list[Finding]]:
    """Diagnose the run in ``run``: the Markdown and the findings; with ``write`` the
    Markdown goes to ``diagnosis.md`` there too."""
    curves = read_run(run, stopped)
    findings = diagnose(curves)
    markdown = render_markdown(findings, curves, run)
    if write:
        (Path(run) / DIAGNOSIS_FILENAME).write_text(markdown, encoding="utf-8")
    return markdown, findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.diagnose",
        description="Say what a run's curves show, and write it to diagnosis.md in the run.",
    )
    parser.add_argument("run", help="a run directory (runs/sft/version_0), or an experiment's")
    parser.add_argument(
        "--no-write", action="store_true", help=f"print only, do not write {DIAGNOSIS_FILENAME}"
    )
    args = parser.parse_args(argv)
    try:
        run = find_run(args.run)
        markdown, _ = diagnose_run(run, write=not args.no_write)
    except DiagnosisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(markdown, end="")
    if not args.no_write:
        print(f"\n(written to {run / DIAGNOSIS_FILENAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "DIAGNOSIS_FILENAME",
    "Curves",
    "DiagnosisError",
    "Finding",
    "Series",
    "Settings",
    "best_checkpoint",
    "diagnose",
    "diagnose_run",
    "find_run",
    "read_run",
    "read_scalars",
    "read_settings",
    "render_markdown",
]
