"""Every logger a run has gets what TensorBoard gets: scalars, hparams, text, tables, files.

Loggers are configured as presets (``configs/logger/*.yaml``) and composed on the command
line: ``--trainer.logger+ configs/logger/wandb.yaml`` adds W&B beside the default TensorBoard
logger. The first TensorBoard (or CSV) logger owns the run directory
(``runs/<experiment>/version_N``); :func:`name_runs` names the others after it (a W&B run
``sft/version_3``, an MLflow run ``version_3`` in experiment ``sft``, CSV files in
``runs/sft/version_3/csv``), so each run is found under the same name everywhere.

Scalars and hparams go through Lightning's ``Logger`` interface. What that interface has no
word for goes through :func:`log_text`, :func:`log_table` and :func:`log_file`, which speak
each backend's own API: this module is the one place that does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from src.errors import ConfigError
from src.strategies import missing_requirements

# the package each logger needs (by class name, ours or Lightning's)
LOGGER_PACKAGES = {
    "WandbLogger": ("wandb", "the W&B logger"),
    "MLFlowLogger": ("mlflow", "the MLflow logger"),
    "LocalMLFlowLogger": ("mlflow", "the MLflow logger"),
    "SwanLabLogger": ("swanlab", "the SwanLab logger"),
}
CSV_SUBDIR = "csv"  # beside the TensorBoard events: both loggers write an hparams.yaml


# ------------------------------------------------------------------------------ the loggers


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger, with the run directory under ``runs/`` and our message when
    ``wandb`` is missing. ``offline: true`` writes the run to ``runs/wandb`` for ``wandb
    sync`` later. Every argument of Lightning's ``WandbLogger`` is accepted."""

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "runs",
        offline: bool = False,
        project: str | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        require("WandbLogger")
        Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp otherwise
        super().__init__(
            name=name,
            save_dir=save_dir,
            offline=offline,
            project=project,
            log_model=log_model,
            **kwargs,
        )

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Finish the W&B run with the fit (its summary and config files are written then):
        a second fit in the same process starts a run of its own instead of continuing it."""
        super().finalize(status)
        import wandb

        if wandb.run is not None:
            wandb.run.finish(exit_code=0 if status in ("success", "finished") else 1)


class LocalMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger, tracking to ``runs/mlruns`` unless given a server
    (``http://...``) or a database (``sqlite:///runs/mlflow.db``, with the full ``mlflow``
    package). MLflow 3 keeps its local file store only on request: a ``file:`` URI makes
    that request (``MLFLOW_ALLOW_FILE_STORE``) for this process."""

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = "file:runs/mlruns",
        **kwargs: Any,
    ) -> None:
        require("LocalMLFlowLogger")
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if tracking_uri and tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            **kwargs,
        )


class SwanLabLogger(Logger):
    """SwanLab's own Lightning logger behind our arguments, imported only when used.

    ``mode``: ``offline`` (the default) writes the run under ``log_dir`` for ``swanlab
    sync``; ``cloud`` logs to swanlab.cn; ``local`` serves it with ``swanlab watch`` (needs
    ``swanlab[dashboard]``); ``disabled`` logs nothing.
    """

    def __init__(
        self,
        project: str | None = None,
        experiment_name: str | None = None,
        mode: str = "offline",
        log_dir: str = "runs/swanlog",
        workspace: str | None = None,
        description: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        super().__init__()
        require("SwanLabLogger")
        from swanlab.integration.pytorch_lightning import SwanLabLogger as Backend

        self._project, self._experiment_name = project, experiment_name
        self.backend = Backend(
            project=project,
            experiment_name=experiment_name,
            mode=mode,
            log_dir=log_dir,
            workspace=workspace,
            description=description,
            tags=tags,
        )

    @property
    def name(self) -> str | None:
        return self._project

    @property
    def version(self) -> str | None:
        return self._experiment_name

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        return self.backend.experiment

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.backend.log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.backend.log_metrics(metrics, step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Finish the SwanLab run with the fit (the backend leaves a successful one open until
        the process exits): its file is complete, and a second fit starts a run of its own."""
        self.backend.finalize(status)
        if status in ("success", "finished"):
            import swanlab

            swanlab.finish()


def require(class_name: str) -> None:
    """Raise our one-line ``ConfigError`` when ``class_name``'s package is missing."""
    problem = logger_problem(class_name)
    if problem:
        raise ConfigError(problem)


def logger_problem(class_path: str) -> str | None:
    """Why the logger ``class_path`` (or class name) cannot run here, or None."""
    name = class_path.rpartition(".")[2]
    if name not in LOGGER_PACKAGES:
        return None
    package, what = LOGGER_PACKAGES[name]
    return missing_requirements(what, packages=(package,))


# -------------------------------------------------------------------- one name for each run


def logger_configs(value: Any) -> list[Namespace]:
    """The ``trainer.logger`` setting as a list of ``class_path``/``init_args`` configs."""
    items = value if isinstance(value, list | tuple) else [value]
    return [i for i in items if isinstance(i, Namespace | dict) and i.get("class_path")]


def primary(configs: list[Namespace]) -> Namespace | None:
    """The TensorBoard logger's config: the one that owns the run directory."""
    return next((c for c in configs if c["class_path"].endswith("TensorBoardLogger")), None)


def name_runs(configs: list[Namespace]) -> None:
    """Name every other logger's run after the TensorBoard run, in place.

    Fixes the TensorBoard version (the next free ``version_N`` where none is given) so that
    all loggers agree on it; what a config sets itself is kept. Nothing changes for a
    TensorBoard logger alone.
    """
    main = primary(configs)
    if main is None or len(configs) < 2:
        return
    args = main.get("init_args") or Namespace()
    main["init_args"] = args
    save_dir, experiment = args.get("save_dir") or "runs", args.get("name") or "default"
    if args.get("version") is None:
        args["version"] = TensorBoardLogger(save_dir, experiment).version  # lists, creates nothing
    version = args["version"]
    version_name = version if isinstance(version, str) else f"version_{version}"
    mlflow = {"experiment_name": experiment, "run_name": version_name}
    names = {  # by logger class name: the settings that name its run
        "WandbLogger": {"name": f"{experiment}/{version_name}", "project": experiment},
        "MLFlowLogger": mlflow,
        "LocalMLFlowLogger": mlflow,
        "SwanLabLogger": {"project": experiment, "experiment_name": version_name},
        "CSVLogger": {
            "save_dir": save_dir,
            "name": f"{experiment}/{version_name}",
            "version": CSV_SUBDIR,
        },
    }
    unset = ("lightning_logs", None)  # Lightning's default names count as unset
    for config in configs:
        if config is main:
            continue
        kind = config["class_path"].rpartition(".")[2]
        init = config.get("init_args") or Namespace()
        config["init_args"] = init
        for key, value in names.get(kind, {}).items():
            if init.get(key) in unset or kind == "CSVLogger":  # CSV files go in the run
                init[key] = value


# ---------------------------------------------------------------- what Logger has no word for


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int | None = None) -> None:
    """Markdown ``text`` under ``tag`` in every logger that shows text (rank 0)."""
    if not trainer.is_global_zero:
        return
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        _try(logger, "text", _text, logger, tag, text, step)


def log_table(
    trainer: pl.Trainer, tag: str, rows: list[dict[str, Any]], step: int | None = None
) -> None:
    """``rows`` (dicts with the same keys) as a table under ``tag`` in every logger that
    shows tables: a W&B table, an MLflow table artifact, Markdown for the others (rank 0)."""
    if not trainer.is_global_zero or not rows:
        return
    step = trainer.global_step if step is None else step
    columns = list(rows[0])
    for logger in trainer.loggers:
        _try(logger, "table", _table, logger, tag, columns, rows, step)


def log_file(trainer: pl.Trainer, path: str | Path) -> None:
    """``path`` as an artifact of the run in W&B and MLflow (rank 0); TensorBoard, CSV and
    SwanLab runs have the file in the run directory already."""
    if not trainer.is_global_zero:
        return
    path = Path(path)
    for logger in trainer.loggers:
        _try(logger, "file", _file, logger, path)


def _text(logger: Logger, tag: str, text: str, step: int) -> None:
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(tag, text, global_step=step)
    elif isinstance(logger, LightningWandbLogger):
        logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_text(logger.run_id, text, f"{tag}/step_{step}.md")
    elif isinstance(logger, SwanLabLogger):
        import swanlab

        logger.experiment.log({tag: swanlab.Text(text)}, step=step)


def _table(
    logger: Logger, tag: str, columns: list[str], rows: list[dict[str, Any]], step: int
) -> None:
    if isinstance(logger, LightningWandbLogger):
        data = [[_plain(r.get(c)) for c in columns] for r in rows]
        logger.log_table(key=tag, columns=columns, data=data, step=step)
    elif isinstance(logger, MLFlowLogger):
        data = {c: [_plain(r.get(c)) for r in rows] for c in columns}
        logger.experiment.log_table(logger.run_id, data, f"{tag}/step_{step}.json")
    else:
        _text(logger, tag, markdown_table(columns, rows), step)


def _file(logger: Logger, path: Path) -> None:
    if isinstance(logger, LightningWandbLogger):
        # under files/<run>/: W&B keeps a config.yaml of its own in files/
        logger.experiment.save(str(path), base_path=str(path.parent.parent), policy="now")
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path))


def _try(logger: Logger, what: str, function: Any, *args: Any) -> None:
    """A logger that fails to take a text, table or file warns: the run goes on."""
    try:
        function(*args)
    except Exception as err:  # noqa: BLE001 - a dashboard is never worth a training run
        rank_zero_warn(f"[loggers] {type(logger).__name__} could not log a {what}: {err}")


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """``rows`` as a Markdown table (TensorBoard's TEXT tab renders it)."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    body = ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, *body])


def _cell(value: Any) -> str:
    return str(_plain(value)).replace("|", "\\|").replace("\n", "<br>")


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, default=str)


# ------------------------------------------------------------------ the names TensorBoard shows


def group_metric_names(logger: Logger) -> None:
    """Log Lightning's ``epoch`` as ``train/epoch``: ungrouped, it is the first card a user
    sees in TensorBoard, ahead of the losses (the learning rate is logged as ``train/lr``)."""
    log_metrics = logger.log_metrics

    def grouped(metrics: dict[str, float], step: int | None = None) -> None:
        if "epoch" in metrics:
            metrics = {("train/epoch" if k == "epoch" else k): v for k, v in metrics.items()}
        log_metrics(metrics, step)

    logger.log_metrics = grouped  # type: ignore[method-assign]


__all__ = [
    "CSVLogger",
    "LocalMLFlowLogger",
    "SwanLabLogger",
    "WandbLogger",
    "group_metric_names",
    "log_file",
    "log_table",
    "log_text",
    "logger_configs",
    "logger_problem",
    "markdown_table",
    "name_runs",
]
