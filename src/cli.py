"""The command line: LightningCLI with this template's defaults and argument links.

``python train.py fit --config configs/sft.yaml`` and ``cli_main([...])`` build the same CLI.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from src.callbacks.checkpoint import BestCheckpoint, EarlyStop, RunCheckpoint
from src.callbacks.divergence import DivergenceGuard
from src.callbacks.preemption import Preemption
from src.callbacks.run_record import RunRecord
from src.datamodules.base import BaseDataModule
from src.modules.base import CausalLMModule

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Deprecation notices raised inside torchdata and lightning themselves, not actionable here.
warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated")
warnings.filterwarnings("ignore", message=".*LeafSpec.* is deprecated")


# data settings the model takes too: given once, under data (a saved config.yaml holds them
# there only)
LINKED_DATA_ARGS = ("tokenizer", "max_length", "chat_template")


class LLMCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with run-directory conventions.

    Runs are written to ``runs/<experiment>/version_N/`` (TensorBoard events, ``config.yaml``,
    ``run.json``, ``checkpoints/``, ``hf/``). ``--ckpt_path last`` resumes the newest run of
    the experiment in its own directory.

    Argument groups beside ``trainer``, ``model`` and ``data`` (each one callback, whatever
    ``trainer.callbacks`` a config lists): ``checkpoint`` (periodic and ``last.ckpt``),
    ``best`` (the top k by ``val/loss``, off by default), ``early_stopping`` (off by
    default), ``preemption``, ``divergence``.
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # what was parsed goes into run.json (beside sys.argv, which differs from Python)
        given = sys.argv[1:] if args is None else args
        argv = [str(a) for a in given] if isinstance(given, list | tuple) else None
        self.save_config_kwargs = {**self.save_config_kwargs, "argv": argv}
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_DATA_ARGS:
            parser.link_arguments(f"data.init_args.{name}", f"model.init_args.{name}")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_lightning_class_args(BestCheckpoint, "best")
        parser.add_lightning_class_args(EarlyStop, "early_stopping")
        parser.set_defaults(
            {
                "checkpoint.filename": "step={step}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.every_n_train_steps": 500,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "default"},
                },
                "trainer.callbacks": [
                    {
                        "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                        "init_args": {"logging_interval": "step"},
                    }
                ],
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None or not config.get("ckpt_path"):
            return
        logger = config["trainer"].get("logger")
        if not logger or "TensorBoardLogger" not in str(logger.get("class_path", "")):
            return
        args = logger["init_args"]
        experiment_dir = Path(args["save_dir"]) / (args.get("name") or "default")
        ckpt_path, version = resolve_checkpoint(config["ckpt_path"], experiment_dir)
        config["ckpt_path"] = ckpt_path
        if self.subcommand == "fit" and version is not None and args.get("version") is None:
            args["version"] = version  # keep writing into the run being resumed


def resolve_checkpoint(ckpt_path: str, experiment_dir: Path) -> tuple[str, int | None]:
    """Map ``last`` to the newest ``last.ckpt`` of the experiment; find a path's version.

    Returns the checkpoint path and the ``version_N`` number of the run it belongs to, if any.
    """
    if ckpt_path == "last":
        found = sorted(
            experiment_dir.glob("version_*/checkpoints/last.ckpt"),
            key=lambda p: _version_number(p.parent.parent.name),
        )
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path last: no {experiment_dir}/version_*/checkpoints/last.ckpt to resume"
            )
        ckpt_path = str(found[-1])
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    run_dir = path.resolve().parent.parent
    if run_dir.parent == experiment_dir.resolve() and run_dir.name.startswith("version_"):
        return ckpt_path, _version_number(run_dir.name)
    return ckpt_path, None


def _version_number(name: str) -> int:
    match = re.fullmatch(r"version_(\d+)", name)
    return int(match.group(1)) if match else -1


def cli_main(args: list[str] | None = None, run: bool = True) -> LLMCLI:
    """Build the CLI (and run the subcommand when ``run``), as ``train.py`` does."""
    kwargs: dict[str, Any] = {}
    if not run:
        kwargs["run"] = False
    return LLMCLI(
        CausalLMModule,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_callback=RunRecord,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        **kwargs,
    )


__all__ = ["LLMCLI", "cli_main", "resolve_checkpoint"]
