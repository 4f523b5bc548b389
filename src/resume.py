"""Resuming a fit: which checkpoint, into which run directory, under which config.

- ``--ckpt_path last`` takes the most recently written ``last.ckpt`` of the experiment, or a
  checkpoint of that run at a later step where one completed and ``last.ckpt`` did not.
- A checkpoint that is the newest of its run continues that run in its own directory, so its
  curves go on. An older one (or one from another experiment) starts a new version
  directory, whose ``run.json`` records where it came from: a finished run's ``hf/``,
  ``config.yaml`` and checkpoints are never replaced (a logger ``version`` that names the
  run of an older checkpoint is refused).
- The config given is compared with the run's ``config.yaml``. A resume may change how long
  the fit runs and how it logs, validates, saves and where it runs (``trainer.*`` and the
  callback groups); a difference in the model, the data, the objective or what one optimizer
  step computes is refused, by name, unless ``--allow_changes`` names it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_info

from src.callbacks.run_record import flatten_config
from src.checkpoint_io import read_checkpoint
from src.errors import PathNotFoundError, ResumeError

# What a resume may change: the length of the fit, logging, validation, checkpointing and
# the machines it runs on; and, within the model and data, settings that leave the training
# itself as it was.
RESUMABLE = (
    "trainer.",
    "checkpoint.",
    "best.",
    "early_stopping.",
    "preemption.",
    "divergence.",
    "data.init_args.num_workers",
    "data.init_args.num_proc",
    "data.init_args.val_batch_size",
    "data.init_args.cache_dir",
    "data.init_args.predict_files",
    "model.init_args.max_new_tokens",
    "model.init_args.compile",
)
# trainer settings that change what one optimizer step computes
NOT_RESUMABLE = (
    "seed_everything",
    "trainer.accumulate_grad_batches",
    "trainer.precision",
    "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm",
)
# set by the resolution itself, or naming where to write
IGNORED = ("ckpt_path", "allow_changes", "trainer.logger")
LAST = re.compile(r"last(-v\d+)?\.ckpt")


@dataclass
class Resume:
    """Where a fit resumes from and what it writes into.

    Attributes:
        checkpoint: The checkpoint path (``last`` resolved).
        version: The logger's ``version`` to write into; None: the next ``version_N``.
        continues: Whether that is the checkpoint's own run, continued in place.
        run: The run directory the checkpoint belongs to, if it is in one.
        step: The checkpoint's optimizer step, where it can be read.
        newest_step: The step of the newest checkpoint of that run.
        changed: Config keys that differ from the run's, allowed: ``key: (run's, given)``.
    """

    checkpoint: str
    version: int | str | None
    continues: bool
    run: str | None = None
    step: int | None = None
    newest_step: int | None = None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """For ``run.json``: ``resumed_from``."""
        return {
            "checkpoint": self.checkpoint,
            "run": self.run,
            "step": self.step,
            "mode": "continued in place" if self.continues else "new run",
            "newest_step_of_run": self.newest_step,
            "changed": {k: {"run": a, "given": b} for k, (a, b) in self.changed.items()},
        }

    def message(self, run_dir: str | None) -> str:
        step = f"step {self.step}" if self.step is not None else "the checkpoint"
        if self.continues:
            text = f"[resume] {step} of {self.run}: continuing in place ({self.checkpoint})"
        elif self.run is not None:
            newest = f" (whose newest checkpoint is step {self.newest_step})"
            text = (
                f"[resume] {step} of {self.run}{newest if self.newest_step is not None else ''}"
                f": a new run in {run_dir}, the original is left as it is"
            )
        else:
            text = f"[resume] {self.checkpoint}: a new run in {run_dir}"
        if self.changed:
            text += "; changed: " + ", ".join(
                f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in self.changed.items()
            )
        return text


def resolve_checkpoint(ckpt_path: str, experiment_dir: Path) -> tuple[str, int | str | None]:
    """Map ``last`` to the experiment's most recently written ``last.ckpt``; find the version
    of the run a checkpoint belongs to (N of ``version_N``, or the run's own name; None for a
    checkpoint outside the experiment's runs)."""
    if ckpt_path == "last":
        found = [
            p for p in experiment_dir.glob("*/checkpoints/last*.ckpt") if LAST.fullmatch(p.name)
        ]
        if not found:
            raise PathNotFoundError(
                f"--ckpt_path last: no {experiment_dir}/version_*/checkpoints/last.ckpt to resume"
            )
        last = max(found, key=_written)
        ckpt_path = str(_newer_than(last) or last)
    path = Path(ckpt_path)
    if not path.exists():
        raise PathNotFoundError(f"checkpoint not found: {ckpt_path}")
    resolved = path.resolve()
    run_dir = resolved.parent.parent
    if resolved.parent.name == "checkpoints" and run_dir.parent == experiment_dir.resolve():
        number = _version_number(run_dir.name)
        return ckpt_path, number if number >= 0 else run_dir.name
    return ckpt_path, None


def plan_resume(
    ckpt_path: str,
    experiment_dir: Path,
    config: dict[str, Any],
    allow_changes: list[str] | tuple[str, ...] = (),
    version: int | str | None = None,
) -> Resume:
    """Resolve ``ckpt_path``, check ``config`` against its run's, and decide where to write.

    ``version``: the logger's version as given (None: not given). Raises ``ResumeError``
    naming the settings that differ from the run's ``config.yaml`` where the difference
    changes the training (see the module docstring), and where ``version`` names the run of
    a checkpoint older than the run's newest.
    """
    requested = ckpt_path
    ckpt_path, own = resolve_checkpoint(ckpt_path, experiment_dir)
    path = Path(ckpt_path)
    run = path.resolve().parent.parent
    in_run = path.resolve().parent.name == "checkpoints"
    resume = Resume(ckpt_path, version, continues=False, run=_shown(run) if in_run else None)
    newest = True
    if in_run:
        resume.step = checkpoint_step(path)
        last = newest_checkpoint(path.parent)
        resume.newest_step = checkpoint_step(last) if last is not None else None
        newest = _is_newest(path, resume.step, last, resume.newest_step)
    if own is not None and (version is None or _run_name(version) == _run_name(own)):
        if not newest and version is not None:
            raise ResumeError(
                f"{ckpt_path} is older than the newest checkpoint of {resume.run} (step "
                f"{resume.newest_step}): resuming it into that run would replace its files; "
                "leave out trainer.logger.init_args.version (a new version) or name another"
            )
        if newest:  # the run's newest: continue it; an older one branches into a new version
            resume.version, resume.continues = own, True
    saved = run / "config.yaml"
    if in_run and saved.is_file():
        ran = yaml.safe_load(saved.read_text()) or {}
        refused, resume.changed = compare_configs(ran, config, allow_changes)
        if refused:
            message = _refusal(requested, ckpt_path, saved, refused, experiment_dir, config)
            raise ResumeError(message)
    return resume


def compare_configs(
    ran: dict[str, Any], given: dict[str, Any], allow: list[str] | tuple[str, ...] = ()
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """The settings that differ between a run's config and the one given, split into those a
    resume may not change and those it may: ``key: (run's value, given value)`` each.

    Keys present on one side only (an option added to the code since) are not compared.
    """
    before, after = flatten_config(ran), flatten_config(given)
    refused: dict[str, tuple[Any, Any]] = {}
    allowed: dict[str, tuple[Any, Any]] = {}
    for key in sorted(before.keys() & after.keys()):
        if before[key] == after[key] or _matches(key, IGNORED):
            continue
        resumable = _matches(key, RESUMABLE) and not _matches(key, NOT_RESUMABLE)
        target = allowed if resumable or _matches(key, tuple(allow)) else refused
        target[key] = (before[key], after[key])
    return refused, allowed


def checkpoint_step(path: Path | None) -> int | None:
    """The optimizer step a checkpoint was saved at: read from a checkpoint file (memory-
    mapped, so its tensors are not read) or a sharded directory's ``meta.pt``; None where
    it cannot be read."""
    if path is None:
        return None
    target = path / "meta.pt" if path.is_dir() else path
    if not target.is_file():
        return None
    try:
        step = read_checkpoint(target, mmap=True).get("global_step")
    except Exception:  # not a checkpoint we can read: fall back to the file times
        return None
    return int(step) if step is not None else None


def newest_checkpoint(directory: Path) -> Path | None:
    """The most recently written ``*.ckpt`` (file or sharded directory) in ``directory``."""
    found = [p for p in directory.glob("*.ckpt") if not p.name.startswith(".")]
    return max(found, key=_written) if found else None


def _newer_than(last: Path) -> Path | None:
    """A checkpoint of the same run at a later step than ``last``: a periodic save that
    completed where the ``last.ckpt`` written after it did not (the process was killed)."""
    newest = newest_checkpoint(last.parent)
    if newest is None or newest == last:
        return None
    step, last_step = checkpoint_step(newest), checkpoint_step(last)
    if step is None or last_step is None or step <= last_step:
        return None
    rank_zero_info(f"[resume] {last} is at step {last_step}, {newest.name} at {step}: taking it")
    return newest


def _is_newest(path: Path, step: int | None, newest: Path | None, newest_step: int | None) -> bool:
    if newest is None:
        return True
    if step is not None and newest_step is not None:
        return step >= newest_step
    return path.resolve() == newest.resolve()


def _refusal(
    requested: str,
    ckpt_path: str,
    saved: Path,
    refused: dict[str, tuple[Any, Any]],
    experiment_dir: Path,
    config: dict[str, Any],
) -> str:
    lines = [
        f"--ckpt_path {requested} resumes {ckpt_path}, trained with another config: these "
        f"settings differ from {saved}:"
    ]
    lines += [f"  {k}: {_short(a)} (run) -> {_short(b)} (given)" for k, (a, b) in refused.items()]
    matching = _matching_run(experiment_dir, config, exclude=saved.parent)
    if requested == "last" and matching is not None:
        lines.append(f"the newest run with this config: --ckpt_path {matching}")
    keys = ",".join(refused)
    lines.append(
        "start a new run without --ckpt_path, give the run's settings, or resume anyway with "
        f"--allow_changes '[{keys}]'"
    )
    return "\n".join(lines)


def _matching_run(experiment_dir: Path, config: dict[str, Any], exclude: Path) -> str | None:
    """The most recently written ``last.ckpt`` of a run of the experiment whose config
    differs from ``config`` in resumable settings only."""
    found = []
    for last in experiment_dir.glob("*/checkpoints/last.ckpt"):
        run = last.parent.parent
        saved = run / "config.yaml"
        if run.resolve() == exclude.resolve() or not saved.is_file():
            continue
        refused, _ = compare_configs(yaml.safe_load(saved.read_text()) or {}, config)
        if not refused:
            found.append(last)
    return str(max(found, key=_written)) if found else None


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def _written(path: Path) -> tuple[int, int, str]:
    """Order of writing: the file time (ties, within the clock's granularity, go to the
    higher version)."""
    return os.stat(path).st_mtime_ns, _version_number(path.parent.parent.name), path.name


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _run_name(version: int | str) -> str:
    """The directory name the TensorBoard logger gives a version."""
    return f"version_{version}" if isinstance(version, int) else str(version)


def _version_number(name: str) -> int:
    match = re.fullmatch(r"version_(\d+)", name)
    return int(match.group(1)) if match else -1


__all__ = [
    "Resume",
    "ResumeError",
    "checkpoint_step",
    "compare_configs",
    "newest_checkpoint",
    "plan_resume",
    "resolve_checkpoint",
]
