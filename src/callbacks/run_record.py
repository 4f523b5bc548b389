"""What a run was: its config in TensorBoard (HPARAMS, TEXT) and ``run.json`` beside it.

``run.json`` records what ``config.yaml`` cannot: the code (git commit and whether the tree
had uncommitted changes), the package versions, the command line, the data's fingerprints,
the machine and the time. TensorBoard's HPARAMS tab shows the whole config flattened to
dotted keys (``model.init_args.beta``, ``data.init_args.packing``, ``trainer.max_steps``...),
one row per run, beside its metrics (``val/loss`` and every other scalar of the run).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, is_dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from src.callbacks.run_dir import run_dir
from src.compat import skip_hparams_autolog, write_summary
from src.loggers import log_file, log_text
from src.model_card import RECORD_FILENAME

UNKNOWN = "unknown"

# (name in the record, module, distribution): required first, then the optional extras
PACKAGES = [
    ("torch", "torch", "torch"),
    ("lightning", "lightning", "lightning"),
    ("transformers", "transformers", "transformers"),
    ("datasets", "datasets", "datasets"),
    ("peft", "peft", "peft"),
    ("torchmetrics", "torchmetrics", "torchmetrics"),
    ("tokenizers", "tokenizers", "tokenizers"),
    ("jsonargparse", "jsonargparse", "jsonargparse"),
    ("torchdata", "torchdata", "torchdata"),
]
OPTIONAL_PACKAGES = [
    ("deepspeed", "deepspeed", "deepspeed"),
    ("bitsandbytes", "bitsandbytes", "bitsandbytes"),
    ("liger_kernel", "liger_kernel", "liger-kernel"),
]


class RunRecord(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, plus ``run.json``, hparams and the config as text.

    On global rank 0, when a subcommand (fit, validate, test, predict) sets up:

    - ``config.yaml``: the full, resolved config (LightningCLI's own file);
    - ``run.json``: :func:`run_record` (a resumed fit keeps the earlier records under
      ``previous``);
    - TensorBoard: the flattened config as the run's hparams (one session per run: Lightning's
      own logging of the module's hparams and its ``hp_metric`` are switched off), and the
      config and record as text (``run/config``, ``run/record``). Other loggers get the
      flattened config through their ``log_hyperparams``, the texts through
      ``src.loggers.log_text``, and W&B and MLflow ``run.json`` and ``config.yaml`` as
      artifacts.

    ``trainer.enable_autolog_hparams: false`` leaves hparams out; files and text are written.

    Args:
        argv: The arguments the CLI parsed (recorded beside ``sys.argv``).
        resume: The ``src.resume.Resume`` of a resumed fit: recorded as ``resumed_from``
            and announced.
        **kwargs: ``SaveConfigCallback`` arguments.
    """

    def __init__(
        self, *args: Any, argv: list[str] | None = None, resume: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.argv = argv
        self.resume = resume

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        first = not self.already_saved
        super().setup(trainer, pl_module, stage)  # config.yaml, then save_config on rank 0
        if first and getattr(trainer, "enable_autolog_hparams", True):
            # the whole config was logged instead: no second, module-only hparams session
            skip_hparams_autolog(pl_module)
            if trainer.datamodule is not None:
                skip_hparams_autolog(trainer.datamodule)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config_text = self.parser.dump(self.config, skip_none=False, skip_check=True)
        config = yaml.safe_load(config_text) or {}
        record = run_record(trainer, stage, self.argv, config.get("ckpt_path"))
        directory = run_dir(trainer)
        if self.resume is not None and stage == "fit":
            record["resumed_from"] = self.resume.record()
            rank_zero_info(self.resume.message(directory))
        local = directory is not None and "://" not in str(directory)
        if local:
            path = Path(directory) / RECORD_FILENAME
            path.parent.mkdir(parents=True, exist_ok=True)
            write_record(path, record)
        elif directory is not None:
            rank_zero_warn(
                f"[run record] {RECORD_FILENAME} is written to local run directories "
                f"only, not to {directory}; it is in TensorBoard (run/record)"
            )
        log_hparams = getattr(trainer, "enable_autolog_hparams", True)
        flat = flatten_config(config)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and log_hparams:
                write_summary(logger.experiment, session_start_summary(flat))
                logger.hparams.update(config)  # hparams.yaml
            elif log_hparams:
                logger.log_hyperparams(flat)
        log_text(trainer, "run/config", as_markdown_code(config_text), 0)
        log_text(trainer, "run/record", as_markdown_code(json.dumps(record, indent=2)), 0)
        if local:  # W&B and MLflow artifacts
            for name in (RECORD_FILENAME, self.config_filename):
                if (Path(directory) / name).exists():
                    log_file(trainer, Path(directory) / name)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.flush()


# ------------------------------------------------------------------------------- the record


def run_record(
    trainer: pl.Trainer,
    stage: str,
    argv: list[str] | None = None,
    ckpt_path: str | None = None,
) -> dict[str, Any]:
    """The facts of this run that ``config.yaml`` does not hold (see the module docstring).

    ``ckpt_path``: the checkpoint the run starts from (a fit resumes it; validate, test and
    predict evaluate it), as resolved (``last`` becomes a path).
    """
    record: dict[str, Any] = {
        "subcommand": stage,
        "start_time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "args": list(argv) if argv is not None else None,
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "devices": trainer.num_devices,
        "strategy": type(trainer.strategy).__name__,
        "accelerator": type(trainer.accelerator).__name__,
        "precision": str(trainer.precision),
        "ckpt_path": str(ckpt_path or trainer.ckpt_path or "") or None,
        "git": git_state(),
        "versions": package_versions(),
        "data": data_fingerprints(trainer.datamodule),
    }
    gpu = _gpu_name(trainer)
    if gpu:
        record["gpu"] = gpu
    return record


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path``; the records already there go under ``previous``."""
    previous: list[Any] = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict):
            previous = list(old.pop("previous", []) or []) + [old]
    if previous:
        record = {**record, "previous": previous}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


def git_state(cwd: str | Path | None = None) -> dict[str, Any]:
    """The commit checked out in ``cwd`` (default: the working directory) and whether the
    tree differs from it (modified, staged or untracked files; ignored ones do not count).

    ``"unknown"`` for both where git is missing or ``cwd`` is not inside a repository.
    """
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    commit = _git(["rev-parse", "HEAD"], cwd)
    status = _git(["status", "--porcelain", "--untracked-files=normal"], cwd)
    if commit is None or status is None:
        return {"commit": UNKNOWN, "dirty": UNKNOWN}
    changes = [line for line in status.splitlines() if line.strip()]
    state: dict[str, Any] = {"commit": commit.strip(), "dirty": bool(changes)}
    if changes:
        state["changes"] = changes[:50] + ([f"... {len(changes) - 50} more"] * (len(changes) > 50))
    return state


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages a run depends on; the optional extras
    (deepspeed, bitsandbytes, liger_kernel) only where installed."""
    versions = {"python": platform.python_version()}
    for name, module, dist in PACKAGES:
        versions[name] = _version(module, dist) or "not installed"
    for name, module, dist in OPTIONAL_PACKAGES:
        version = _version(module, dist)
        if version:
            versions[name] = version
    return versions


def _version(module: str, dist: str) -> str | None:
    """The imported module's ``__version__``, else the installed distribution's (without
    importing it: deepspeed, for one, is slow to import and prints as it does)."""
    loaded = sys.modules.get(module)
    version = getattr(loaded, "__version__", None) if loaded is not None else None
    if version is not None:
        return str(version)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def data_fingerprints(datamodule: Any) -> dict[str, Any] | None:
    """The data module's cache key and the fingerprints of its train and validation sources.

    The cache key (``BaseDataModule.cache_path``'s name) changes with the file contents, the
    tokenizer and template and every data setting; the fingerprints with the sources'
    settings and contents alone. Without a cache directory neither is computed (it would
    read the whole corpus again): the sources are listed.
    """
    if datamodule is None:
        return None
    record: dict[str, Any] = {"class": f"{type(datamodule).__module__}.{type(datamodule).__name__}"}
    if not hasattr(datamodule, "train_sources"):
        return record  # not one of ours: nothing known to fingerprint
    from src.datamodules.sources import fingerprint

    cache_dir = getattr(datamodule, "cache_dir", None)
    cache_path = getattr(datamodule, "cache_path", None)
    record["cache_key"] = cache_path.name if cache_path is not None else None
    record["fingerprints"] = (
        {
            "train": fingerprint(datamodule.train_sources, cache_dir),
            "val": fingerprint(datamodule.val_sources, cache_dir),
        }
        if cache_dir is not None
        else None
    )
    record["sources"] = {
        "train": [_plain(s) for s in datamodule.train_sources],
        "val": [_plain(s) for s in datamodule.val_sources],
    }
    return record


def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else str(value)


def _gpu_name(trainer: pl.Trainer) -> str | None:
    root = getattr(trainer.strategy, "root_device", None)
    if root is None or root.type != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name(root)


# ---------------------------------------------------------------------------------- hparams


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config as TensorBoard hparams: nested keys joined by dots, scalar values only.

    Dicts are flattened (an empty one is ``"{}"``); lists become one JSON string (``"[1, 2]"``:
    a list is one setting, e.g. ``lora.target_modules``); None becomes ``"null"``, as in the
    YAML; anything else that is not a bool, number or string becomes its ``str``.
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name))
        elif isinstance(value, dict):
            flat[name] = "{}"
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat


def session_start_summary(hparams: dict[str, bool | int | float | str]) -> Any:
    """The TensorBoard summary that makes a run one row of the HPARAMS tab.

    Only the session's start (its hparams) is written, no experiment summary: TensorBoard then
    builds the table from every run in the log directory (the union of their hparams, so SFT
    and DPO runs side by side each show their own keys) and takes the metric columns from the
    runs' scalars (``val/loss``, ``val/ppl``, ...).
    """
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata as hp_metadata
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):  # before int: a bool is an int to Python
            start.hparams[name].bool_value = value
        elif isinstance(value, int | float):
            start.hparams[name].number_value = value
        else:
            start.hparams[name].string_value = str(value)
    content = plugin_data_pb2.HParamsPluginData(
        session_start_info=start, version=hp_metadata.PLUGIN_DATA_VERSION
    )
    plugin = SummaryMetadata.PluginData(
        plugin_name=hp_metadata.PLUGIN_NAME, content=content.SerializeToString()
    )
    return Summary(
        value=[
            Summary.Value(
                tag=hp_metadata.SESSION_START_INFO_TAG,
                metadata=SummaryMetadata(plugin_data=plugin),
            )
        ]
    )


def as_markdown_code(text: str) -> str:
    """``text`` as a Markdown code block (TensorBoard's TEXT tab renders Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


__all__ = [
    "RunRecord",
    "data_fingerprints",
    "flatten_config",
    "git_state",
    "package_versions",
    "run_record",
    "session_start_summary",
]
