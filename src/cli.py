"""The command line: LightningCLI with this template's defaults and argument links.

``python train.py fit --config configs/sft.yaml`` and ``cli_main([...])`` build the same CLI.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from src.callbacks.checkpoint import BestCheckpoint, EarlyStop, RunCheckpoint
from src.callbacks.divergence import DivergenceGuard
from src.callbacks.preemption import Preemption
from src.callbacks.run_record import RunRecord
from src.datamodules.base import BaseDataModule
from src.modules.base import CausalLMModule
from src.resume import plan_resume, resolve_checkpoint

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
    ``run.json``, ``checkpoints/``, ``hf/``). ``--ckpt_path`` resumes a fit as ``src.resume``
    decides: the newest checkpoint of a run continues it in place, an older one starts a new
    version; a config that would train something else is refused, naming the settings.

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
        parser.add_argument(
            "--allow_changes",
            type=list[str],
            default=[],
            help="Config keys (or prefixes, e.g. model.init_args.optimizer) that a resumed "
            "fit may change beyond the resumable ones (length, logging, validation, saving)",
        )
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
        if self.subcommand != "fit":  # evaluation writes a run of its own
            config["ckpt_path"], _ = resolve_checkpoint(config["ckpt_path"], experiment_dir)
            return
        given = yaml.safe_load(
            self._parser(self.subcommand).dump(config, skip_none=False, skip_check=True)
        )
        allow = config.get("allow_changes") or []
        resume = plan_resume(config["ckpt_path"], experiment_dir, given, allow, args.get("version"))
        config["ckpt_path"] = resume.checkpoint
        args["version"] = resume.version  # the run continued, a name given, or the next one
        self.save_config_kwargs = {**self.save_config_kwargs, "resume": resume}


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
