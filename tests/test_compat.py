"""Each function of ``src.compat`` against the installed libraries: a library upgrade that
renames a private name the template relies on fails here, in one place."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
import types
from pathlib import Path

import jinja2
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel, RandomDataset
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader, IterableDataset

import src
from src import compat

QUIET = {
    "accelerator": "cpu",
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
}


class RecordingLogger(Logger):
    """A logger that keeps what Lightning hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[dict, int | None]] = []
        self.hparams: list[dict] = []

    name = "recording"
    version = 0

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams.append(dict(params))


class Model(BoringModel):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("x", out["loss"])
        return out


class Data(BoringDataModule):
    def __init__(self, rows: int = 7) -> None:
        super().__init__()
        self.save_hyperparameters()


def fit(
    model: pl.LightningModule,
    steps: int = 1,
    datamodule: pl.LightningDataModule | None = None,
    **kw,
) -> pl.Trainer:
    """A CPU trainer fitted ``steps`` optimizer steps, quietly; ``kw`` are Trainer arguments."""
    trainer = pl.Trainer(max_steps=steps, **{"logger": False, **QUIET, **kw})
    trainer.fit(model, datamodule=datamodule)
    return trainer


# ----------------------------------------------------------------------------- Lightning


def test_attached_trainer_is_none_when_detached_and_the_trainer_once_attached():
    module = BoringModel()
    assert compat.attached_trainer(module) is None
    with pytest.raises(RuntimeError):  # what the public property does instead
        _ = module.trainer
    trainer = pl.Trainer(logger=False, **QUIET)
    module.trainer = trainer
    assert compat.attached_trainer(module) is trainer


def test_redirect_forward_calls_the_method_through_the_wrappers_forward():
    class Module(BoringModel):
        def double(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args):
            self.calls += 1
            return self.inner(*args)

    module = Module()
    strategy = SingleDeviceStrategy(device=torch.device("cpu"))
    strategy.model = Wrapper(module)
    out = compat.redirect_forward(strategy, module, "double", torch.tensor([1.0, 3.0]))
    assert out.tolist() == [2.0, 6.0]
    assert strategy.model.calls == 1
    assert module(torch.ones(1, 32)).shape == (1, 2)  # forward is the module's own again


def test_cluster_environment_is_the_strategys_and_finds_slurm(monkeypatch):
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    trainer = pl.Trainer(devices=2, strategy="ddp", logger=False, **QUIET)
    assert compat.cluster_environment(trainer) is trainer.strategy.cluster_environment
    assert isinstance(compat.cluster_environment(trainer), LightningEnvironment)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    single = pl.Trainer(devices=1, logger=False, **QUIET)  # no strategy.cluster_environment
    assert isinstance(compat.cluster_environment(single), SLURMEnvironment)


@pytest.mark.parametrize(
    ("skip", "logged"),
    [((), {"lr", "rows"}), (("model",), {"rows"}), (("model", "data"), None)],
)
def test_skip_hparams_autolog_keeps_each_objects_hparams_from_the_logger(skip, logged):
    model, data, logger = Model(), Data(), RecordingLogger()
    for name in skip:
        compat.skip_hparams_autolog({"model": model, "data": data}[name])
    fit(model, logger=logger, datamodule=data)
    assert (set(logger.hparams[0]) if logger.hparams else None) == logged


def test_logged_step_is_the_step_of_the_metrics_logged_in_that_batch():
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            seen.append(compat.logged_step(trainer))

    logger = RecordingLogger()
    trainer = fit(Model(), steps=3, logger=logger, log_every_n_steps=1, callbacks=[Probe()])
    assert seen == [step for metrics, step in logger.metrics if "x" in metrics] == [0, 1, 2]
    assert compat.logged_step(trainer) == trainer.global_step == 3


class Unsized(IterableDataset):
    def __iter__(self):
        return iter(RandomDataset(32, 8))


@pytest.mark.parametrize(("dataset", "ahead"), [(Unsized(), 1), (RandomDataset(32, 8), 0)])
def test_prefetched_batches_counts_the_batch_lightning_fetched_ahead(dataset, ahead):
    seen = []

    class Module(BoringModel):
        def training_step(self, batch, batch_idx):
            seen.append(compat.prefetched_batches(self.trainer))
            return super().training_step(batch, batch_idx)

        def train_dataloader(self):
            return DataLoader(dataset)

    fit(Module(), steps=2)
    assert seen == [ahead, ahead]
    assert compat.prefetched_batches(None) == 0


def test_replace_wrapped_checkpoint_io_saves_through_the_new_io(tmp_path):
    saved = []

    class Recording(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            saved.append(Path(path).name)
            super().save_checkpoint(checkpoint, path, storage_options)

    wrapper = AsyncCheckpointIO(TorchCheckpointIO())
    wrapper.checkpoint_io = Recording()
    assert type(wrapper.checkpoint_io) is TorchCheckpointIO  # why the public setter won't do
    compat.replace_wrapped_checkpoint_io(wrapper, Recording())
    wrapper.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    wrapper.teardown()  # waits for the save
    assert saved == ["a.ckpt"]
    assert torch.load(tmp_path / "a.ckpt")["w"].tolist() == [1.0, 1.0]


def test_fsdp_saves_full_state_follows_state_dict_type():
    assert compat.fsdp_saves_full_state(FSDPStrategy())
    assert not compat.fsdp_saves_full_state(FSDPStrategy(state_dict_type="sharded"))


def test_saves_distributed_checkpoint_follows_the_model_parallel_setting():
    assert compat.saves_distributed_checkpoint(ModelParallelStrategy())
    off = ModelParallelStrategy(save_distributed_checkpoint=False)
    assert not compat.saves_distributed_checkpoint(off)


def test_activation_checkpointing_policy_is_the_one_given():
    policy = ModuleWrapPolicy({torch.nn.Linear})
    assert compat.activation_checkpointing_policy(FSDPStrategy()) is None
    strategy = FSDPStrategy(activation_checkpointing_policy=policy)
    assert compat.activation_checkpointing_policy(strategy) is policy


def test_lightning_has_rich_says_whether_its_rich_bar_can_be_built():
    assert compat.lightning_has_rich() == (importlib.util.find_spec("rich") is not None)
    if compat.lightning_has_rich():
        RichProgressBar()
    else:
        with pytest.raises(ModuleNotFoundError):
            RichProgressBar()


def test_subcommand_parsers_and_parser_of_a_cli_with_subcommands():
    args = ["fit", "--trainer.fast_dev_run=1", "--trainer.logger=false"]
    args += [
        f"--trainer.{k}={str(v).lower()}" for k, v in QUIET.items() if k != "limit_val_batches"
    ]
    cli = LightningCLI(BoringModel, BoringDataModule, args=args, save_config_callback=None)
    parsers = compat.subcommand_parsers(cli)
    assert set(parsers) == {"fit", "validate", "test", "predict"}
    assert compat.parser_of(cli, "fit") is parsers["fit"]
    assert compat.parser_of(cli, None) is cli.parser
    assert "trainer.max_steps" in [a.dest for a in compat.parser_actions(parsers["fit"])]


def test_subcommand_parsers_of_a_cli_without_subcommands():
    cli = LightningCLI(BoringModel, run=False, args=["--trainer.logger=false"])
    assert compat.subcommand_parsers(cli) == {}
    assert compat.parser_of(cli, None) is cli.parser


def test_load_distributed_checkpoint_reads_a_sharded_directory_whole(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {"w": torch.arange(3.0)}, "step": 5}, checkpoint_id=tmp_path)
    loaded = compat.load_distributed_checkpoint(tmp_path)
    assert loaded["model"]["w"].tolist() == [0.0, 1.0, 2.0]
    assert loaded["step"] == 5


# ----------------------------------------------------------------------- argparse (jsonargparse)


def test_parser_actions_name_every_nested_option():
    class Settings:
        def __init__(self, beta: float = 0.1, rank: int = 8) -> None:
            pass

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Settings, "model")
    dests = [a.dest for a in compat.parser_actions(parser)]
    assert {"help", "model.beta", "model.rank"} <= set(dests)


# --------------------------------------------------------------------------- transformers


def test_no_split_modules_names_the_decoder_layer(micro_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir))
    assert compat.no_split_modules(model) == ["LlamaDecoderLayer"]
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert compat.no_split_modules(torch.nn.Linear(1, 1)) == []


def test_compile_chat_template_has_transformers_helpers():
    template = (
        "{% if not messages %}{{ raise_exception('no messages') }}{% endif %}"
        "{{ messages[0]['content'] | tojson }}"
    )
    compiled = compat.compile_chat_template(template)
    assert compiled.render(messages=[{"role": "user", "content": "hi"}]) == '"hi"'
    with pytest.raises(jinja2.TemplateError, match="no messages"):
        compiled.render(messages=[])


def test_compile_chat_template_is_none_without_transformers_helper(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.utils.chat_template_utils", None)
    assert compat.compile_chat_template("{{ 1 }}") is None


def test_alias_reasoning_fields_renders_as_apply_chat_template(tokenizer):
    template = "{% for m in messages %}[{{ m.reasoning_content }}]{{ m.content }}{% endfor %}"
    messages = [{"role": "assistant", "content": "4", "reasoning": "2+2"}]
    aliased = compat.alias_reasoning_fields(messages)
    assert aliased[0]["reasoning_content"] == "2+2"
    ours = compat.compile_chat_template(template).render(messages=aliased)
    theirs = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert ours == theirs == "[2+2]4"


def test_alias_reasoning_fields_leaves_messages_without_transformers_helper(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.utils.chat_template_utils", None)
    messages = [{"role": "assistant", "content": "4", "reasoning": "2+2"}]
    assert compat.alias_reasoning_fields(messages) == messages


# --------------------------------------------------------------------------------- torch


def test_wrapper_prefixes_are_the_wrappers_attribute_names():
    from lightning.fabric.strategies import SingleDeviceStrategy as FabricSingleDevice
    from lightning.fabric.wrappers import _FabricModule
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        _CHECKPOINT_WRAPPED_MODULE,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    fabric = _FabricModule(torch.nn.Linear(2, 2), FabricSingleDevice(device=torch.device("cpu")))
    compiled = torch.compile(torch.nn.Linear(2, 2))  # compiles only when called
    wrapped = checkpoint_wrapper(torch.nn.Linear(2, 2))
    children = {next(iter(dict(m.named_children()))) for m in (fabric, compiled, wrapped)}
    assert {f"{c}." for c in children | {FSDP_WRAPPED_MODULE}} == set(compat.WRAPPER_PREFIXES)
    assert _CHECKPOINT_WRAPPED_MODULE in children
    for module in (fabric, compiled):
        names = {compat.without_wrapper_prefixes(n) for n, _ in module.named_parameters()}
        assert names == {"weight", "bias"}
    nested = "model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module._orig_mod.w"
    assert compat.without_wrapper_prefixes(nested) == "model.layers.0.w"


def test_set_wrap_classes_makes_an_empty_policy_wrap_those_classes():
    policy = ModuleWrapPolicy(set())
    assert not policy(module=torch.nn.Linear(1, 1), recurse=False, nonwrapped_numel=0)
    compat.set_wrap_classes(policy, [torch.nn.Linear])
    assert policy(module=torch.nn.Linear(1, 1), recurse=False, nonwrapped_numel=0)
    assert not policy(module=torch.nn.ReLU(), recurse=False, nonwrapped_numel=0)
    assert "Linear" in repr(policy._module_classes_str)


def test_write_summary_lands_in_the_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import scalar

    from src.callbacks.run_record import session_start_summary

    writer = SummaryWriter(str(tmp_path))
    compat.write_summary(writer, scalar("x", 3.0))
    compat.write_summary(writer, session_start_summary({"model.beta": 0.1}))
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("x")] == [3.0]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


# ------------------------------------------------------------------------- optional packages


class FakeZero3Engine:
    """Exposes the private method of ``deepspeed.DeepSpeedEngine`` that compat calls."""

    def _zero3_consolidated_16bit_state_dict(self) -> dict:
        return {"w": torch.ones(2)}


def test_zero3_full_state_dict_with_an_engine_like_deepspeeds():
    """DeepSpeed is not installed in the test environment: a fake engine with the same
    private method stands in; the next test checks the real engine where it is installed."""
    assert compat.zero3_full_state_dict(FakeZero3Engine())["w"].tolist() == [1.0, 1.0]


def test_deepspeed_engine_has_the_zero3_gather():
    deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    method = deepspeed.DeepSpeedEngine._zero3_consolidated_16bit_state_dict
    params = list(inspect.signature(method).parameters.values())[1:]
    assert all(p.default is not inspect.Parameter.empty for p in params)


def test_apply_liger_kernels_calls_liger_on_the_model(monkeypatch):
    """Liger is not installed in the test environment: a fake ``liger_kernel.transformers``
    records the call; the next test checks the real function where it is installed."""
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = torch.nn.Linear(1, 1)
    compat.apply_liger_kernels(model)
    assert calls == [{"model": model}]


def test_apply_liger_kernels_without_liger_is_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(ImportError):
        compat.apply_liger_kernels(torch.nn.Linear(1, 1))


def test_liger_has_the_instance_patcher():
    liger = pytest.importorskip("liger_kernel.transformers", reason="Liger is not installed")
    assert "model" in inspect.signature(liger._apply_liger_kernel_to_instance).parameters


# ------------------------------------------------------------- private hooks of subclasses


@pytest.mark.parametrize("hook", compat.PRIVATE_HOOKS, ids=lambda h: h.id)
def test_private_hook_exists_with_the_expected_signature(hook):
    compat.check_private_hook(hook)


def test_check_private_hook_fails_on_a_renamed_or_changed_hook():
    owner = "lightning.pytorch.callbacks.ModelCheckpoint"
    gone = compat.PrivateHook(owner, "_save_topk", ("trainer",), "a test")
    with pytest.raises(RuntimeError, match="_save_topk .*is gone"):
        compat.check_private_hook(gone)
    changed = compat.PrivateHook(owner, "_save_topk_checkpoint", ("trainer",), "a test")
    with pytest.raises(RuntimeError, match="now takes"):
        compat.check_private_hook(changed)
    attribute = compat.PrivateHook(owner, "_no_such_attribute", None, "a test")
    with pytest.raises(RuntimeError, match="is gone"):
        compat.check_private_hook(attribute)
    compat.require_private_hooks()


def _library_classes_in_src() -> list[tuple[type, list[type]]]:
    found = []
    for info in pkgutil.walk_packages(src.__path__, "src."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == module.__name__:
                bases = [b for b in cls.__mro__[1:] if not b.__module__.startswith("src.")]
                bases = [b for b in bases if b.__module__ not in ("builtins", "typing", "abc")]
                if bases:
                    found.append((cls, bases))
    return found


def test_every_private_member_a_subclass_overrides_or_calls_is_listed():
    listed = {
        (hook.name, getattr(importlib.import_module(m), n))
        for hook in compat.PRIVATE_HOOKS
        for m, _, n in [hook.owner.rpartition(".")]
    }
    missing = []
    for cls, bases in _library_classes_in_src():
        ours = {n for c in cls.__mro__ if c.__module__.startswith("src.") for n in vars(c)}
        source = inspect.getsource(cls)
        called = set(re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)\(", source))
        # members our source defines (a metaclass's own, like Function's _backward_cls, aside)
        overridden = {
            n for n in vars(cls) if re.match(r"_[a-z]", n) and re.search(rf"\b{n}\b", source)
        }
        for name in overridden | (called - ours):
            owners = [b for b in bases if name in vars(b)]
            if owners and not any((name, o) in listed for o in cls.__mro__):
                missing.append(f"{cls.__qualname__}.{name} (of {owners[0].__qualname__})")
    assert not missing, f"add to src.compat.PRIVATE_HOOKS: {missing}"
