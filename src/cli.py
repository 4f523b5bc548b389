"""The command line: LightningCLI with this template's defaults and argument links.

``python train.py fit --config configs/sft.yaml`` and ``cli_main([...])`` build the same CLI.
"""

from __future__ import annotations

import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from src.callbacks.checkpoint import BestCheckpoint, EarlyStop, RunCheckpoint
from src.callbacks.divergence import DivergenceGuard
from src.callbacks.preemption import Preemption
from src.callbacks.progress import default_progress_bar
from src.callbacks.run_record import RunRecord
from src.compat import parser_actions, parser_of, subcommand_parsers
from src.datamodules.base import BaseDataModule
from src.errors import ConfigError, explain_parse_error, one_line
from src.loggers import group_metric_names, logger_configs, logger_problem, name_runs, primary
from src.modules.adapters import qlora_problem
from src.modules.base import CausalLMModule, liger_problem
from src.resume import plan_resume, resolve_checkpoint
from src.strategies import cuda_absence, missing_requirements

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Deprecation notices raised inside torchdata and lightning themselves, not actionable here.
warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated")
warnings.filterwarnings("ignore", message=".*LeafSpec.* is deprecated")


# settings that must be at least 1 (a 0 fails deep inside torch or peft)
AT_LEAST_ONE = (
    "data.init_args.batch_size",
    "data.init_args.val_batch_size",
    "data.init_args.max_length",
    "trainer.accumulate_grad_batches",
    "model.init_args.lora.r",
)

# data settings the model takes too: given once, under data (a saved config.yaml holds them
# there only)
LINKED_DATA_ARGS = ("tokenizer", "max_length", "chat_template")


# What every objective's config would otherwise repeat; a config appends its own callbacks
# with ``callbacks+:`` (``callbacks:`` replaces these).
DEFAULT_TRAINER = {
    "trainer.devices": 1,
    "trainer.precision": "32-true",
    "trainer.check_val_every_n_epoch": None,  # validation every val_check_interval steps
    "trainer.log_every_n_steps": 10,
    "trainer.gradient_clip_val": 1.0,
    "trainer.num_sanity_val_steps": 0,  # ValidateOnStart logs a full validation at step 0
}
DEFAULT_CALLBACKS = [
    {"class_path": "src.callbacks.LearningRate"},  # train/lr
    {"class_path": "src.callbacks.ValidateOnStart"},
    {"class_path": "src.callbacks.HFExport"},
    {  # train/: tokens/s, samples/s, MFU, peak memory
        "class_path": "src.callbacks.Throughput",
        "init_args": {"every_n_steps": 10},
    },
    {"class_path": "src.callbacks.Diagnosis"},  # what the curves show, at the end of fit
]


class LLMCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with run-directory conventions.

    Runs are written to ``runs/<experiment>/version_N/`` (TensorBoard events, ``config.yaml``,
    ``run.json``, ``checkpoints/``, ``hf/``). ``--ckpt_path`` resumes a fit as ``src.resume``
    decides: the newest checkpoint of a run continues it in place, an older one starts a new
    version; a config that would train something else is refused, naming the settings.

    Defaults shared by every objective (``DEFAULT_TRAINER``, ``DEFAULT_CALLBACKS``, seed 42)
    live here, so a config holds what makes its objective.

    Argument groups beside ``trainer``, ``model`` and ``data`` (each one callback, whatever
    ``trainer.callbacks`` a config lists): ``checkpoint`` (periodic and ``last.ckpt``),
    ``best`` (the top k by ``val/loss``, off by default), ``early_stopping`` (off by
    default), ``preemption``, ``divergence``.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # a mistake raises, to be worded as one line below, instead of printing the usage
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # what was parsed goes into run.json (beside sys.argv, which differs from Python)
        given = sys.argv[1:] if args is None else args
        argv = [str(a) for a in given] if isinstance(given, list | tuple) else None
        self.save_config_kwargs = {**self.save_config_kwargs, "argv": argv}
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            keys = parser_keys(self._parser_for(argv or []))
            raise ConfigError(explain_parse_error(str(err), keys, argv)) from err

    def _parser_for(self, argv: list[str]) -> LightningArgumentParser:
        """The parser that reads ``argv``: its subcommand's, or the only one."""
        subparsers = subcommand_parsers(self)
        subcommand = next((a for a in argv if a in subparsers), None)
        return subparsers[subcommand] if subcommand else self.parser

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
                "trainer.callbacks": DEFAULT_CALLBACKS,
                **DEFAULT_TRAINER,
                "seed_everything": 42,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is not None:
            check_machine(config, self.save_config_kwargs.get("argv") or [])
        if config is None:
            return
        loggers = logger_configs(config["trainer"].get("logger"))
        self._plan_resume(config, primary(loggers))
        name_runs(loggers)  # the other loggers' runs named after the TensorBoard run

    def _plan_resume(self, config: Namespace, logger: Namespace | None) -> None:
        """Decide which checkpoint and run directory ``--ckpt_path`` continues."""
        if not config.get("ckpt_path") or logger is None:
            return
        args = logger["init_args"]
        experiment_dir = Path(args["save_dir"]) / (args.get("name") or "default")
        if self.subcommand != "fit":  # evaluation writes a run of its own
            config["ckpt_path"], _ = resolve_checkpoint(config["ckpt_path"], experiment_dir)
            return
        given = yaml.safe_load(
            parser_of(self, self.subcommand).dump(config, skip_none=False, skip_check=True)
        )
        allow = config.get("allow_changes") or []
        resume = plan_resume(config["ckpt_path"], experiment_dir, given, allow, args.get("version"))
        config["ckpt_path"] = resume.checkpoint
        args["version"] = resume.version  # the run continued, a name given, or the next one
        self.save_config_kwargs = {**self.save_config_kwargs, "resume": resume}

    def after_instantiate_classes(self) -> None:
        share_tokenizer(self.model, self.datamodule)

    # a private hook of LightningCLI: checked by src.compat.PRIVATE_HOOKS
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        given = config.get("callbacks") or []
        given = [*(given if isinstance(given, list) else [given]), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            callbacks = [*callbacks, default_progress_bar()]  # counts steps, not epochs
        try:
            trainer = super()._instantiate_trainer(config, callbacks)
        except ConfigError:
            raise
        except (MisconfigurationException, ValueError, TypeError) as err:
            # a value the parser let through (accelerator, devices...): Lightning's words
            raise ConfigError(f"trainer: {one_line(err)}") from err
        for logger in trainer.loggers:
            group_metric_names(logger)
        return trainer


def share_tokenizer(model: Any, datamodule: Any) -> None:
    """Hand the model's tokenizer to the data module when it would load the same one: one
    load per run. Safe to share: after loading neither side changes it for good (generation
    switches the padding side and restores it, and clears the backend padding it leaves)."""
    key = getattr(model, "tokenizer_key", None)
    if key is None or key != getattr(datamodule, "tokenizer_key", None):
        return
    if "tokenizer" not in vars(datamodule):  # not loaded (nor set) yet
        datamodule.tokenizer = model.tokenizer


def parser_keys(parser: LightningArgumentParser) -> list[str]:
    """Every dotted key ``parser`` accepts (``trainer.max_steps``, ``model``, ...)."""
    skip = ("help", "print_config", "print_shtab")
    keys = (a.dest for a in parser_actions(parser) if a.dest not in skip)
    return [k for k in dict.fromkeys(keys) if not k.endswith(".help")]


def check_machine(config: Namespace, argv: list[str]) -> None:
    """Refuse, in one line, settings this machine cannot run (a GPU preset without a GPU, an
    optional package not installed) and values that cannot work, before anything is built."""
    trainer = config.get("trainer") or Namespace()
    accelerator = _class_or_name(trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda", "cudaaccelerator"):
        reason = cuda_absence(mps_counts=accelerator == "gpu")  # "gpu" is Apple's GPU too
        if reason:
            preset = _preset(argv, "accelerator")
            what = (
                f"the {Path(preset).stem} preset ({preset})"
                if preset
                else f"trainer.accelerator {trainer.get('accelerator')}"
            )
            instead = (
                "leave --trainer out: the objective configs use accelerator: auto"
                if preset
                else "--trainer.accelerator auto"
            )
            raise ConfigError(
                f"{what} needs a CUDA GPU and none is visible ({reason}); "
                f"use --trainer configs/trainer/cpu.yaml (or {instead})"
            )
    if "deepspeed" in _class_or_name(trainer.get("strategy")):
        preset = _preset(argv, "strategy")
        what = f"the {Path(preset).stem} preset ({preset})" if preset else "DeepSpeed"
        problem = missing_requirements(what, packages=("deepspeed",))
        if problem:
            raise ConfigError(problem)
    for logger in logger_configs(trainer.get("logger")):
        problem = logger_problem(logger["class_path"])
        if problem:
            raise ConfigError(f"{problem} (trainer.logger {logger['class_path']})")
    model = config.get("model") or Namespace()
    init = model.get("init_args") or Namespace()
    if init.get("liger_kernels") and (problem := liger_problem()):
        raise ConfigError(problem)
    lora = init.get("lora")
    # (with from_scratch the module refuses QLoRA itself, whatever the machine)
    if lora is not None and lora.get("load_in_4bit") and not init.get("from_scratch"):
        problem = qlora_problem()
        if problem:
            raise ConfigError(problem)
    for key in AT_LEAST_ONE:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")


def _class_or_name(value: Any) -> str:
    """``"gpu"``, or a ``class_path``'s class name, lower case; ``""`` for anything else."""
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, Namespace | dict):
        return str(value.get("class_path", "")).rpartition(".")[2].lower()
    return type(value).__name__.lower() if value is not None else ""


def _preset(argv: list[str], key: str) -> str | None:
    """The last ``--trainer FILE`` of the command line, if that file sets ``key``."""
    files = [b for a, b in zip(argv, argv[1:], strict=False) if a == "--trainer"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--trainer=")]
    for file in reversed(files):
        try:
            content = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(content, dict) and key in content:
            return file
    return None


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


def close_process_group() -> None:
    """Leave the process group once the subcommand is done, every rank together: a rank that
    exits while rank 0 still writes (the export) otherwise aborts ("terminate called without
    an active exception") in the communication threads, after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["LLMCLI", "check_machine", "cli_main", "close_process_group", "resolve_checkpoint"]
