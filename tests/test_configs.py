"""Every shipped YAML parses; top-level configs instantiate without training."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.cli import cli_main
from src.datamodules import PreferenceDataModule, PretrainDataModule, SFTDataModule
from src.modules import DPOModule, LoraSettings, PretrainModule, SFTModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOP_LEVEL = sorted(CONFIGS.glob("*.yaml"))
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
PEFT = sorted((CONFIGS / "peft").glob("*.yaml"))
RECIPES = sorted((CONFIGS / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def sft_cli():
    return cli_main(["--config", str(CONFIGS / "sft.yaml")], run=False)


@pytest.mark.parametrize("config", TOP_LEVEL, ids=lambda p: p.name)
def test_top_level_config_instantiates(config):
    cli = cli_main(["--config", str(config)], run=False)
    assert cli.model.tokenizer_name_or_path == cli.datamodule.tokenizer_name_or_path
    assert cli.model.max_length == cli.datamodule.max_length


def test_sft_config_builds_the_documented_classes(sft_cli):
    assert isinstance(sft_cli.model, SFTModule) and isinstance(sft_cli.datamodule, SFTDataModule)
    assert sft_cli.trainer.max_steps > 0
    assert Path(sft_cli.trainer.logger.log_dir).parts[-3:-1] == ("runs", "sft")


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.name)
def test_trainer_preset_composes_with_sft(sft_cli, preset):
    parsed = sft_cli.parser.parse_args(
        ["--config", str(CONFIGS / "sft.yaml"), "--trainer", str(preset)]
    )
    for key, value in _yaml(preset).items():
        if key == "strategy" and isinstance(value, dict):  # a class: check what was given
            assert parsed.trainer.strategy.class_path == value["class_path"]
            for arg, given in value["init_args"].items():
                parsed_value = parsed.trainer.strategy.init_args[arg]
                assert getattr(parsed_value, "name", parsed_value) == given
        else:
            assert parsed.trainer[key] == value


@pytest.mark.parametrize(
    "name, module, data",
    [
        ("pretrain.yaml", PretrainModule, PretrainDataModule),
        ("dpo.yaml", DPOModule, PreferenceDataModule),
    ],
)
def test_each_objective_config_builds_its_classes(name, module, data):
    cli = cli_main(["--config", str(CONFIGS / name)], run=False)
    assert type(cli.model) is module and type(cli.datamodule) is data


@pytest.mark.parametrize("top", TOP_LEVEL, ids=lambda p: p.name)
@pytest.mark.parametrize("peft", PEFT, ids=lambda p: p.name)
def test_peft_configs_compose_with_every_objective(top, peft):
    cli = cli_main(["--config", str(top), "--config", str(peft)], run=False)
    expected = _yaml(peft)["model"]["init_args"]["lora"]
    assert isinstance(cli.model.lora, LoraSettings)
    assert {k: getattr(cli.model.lora, k) for k in expected} == expected


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_parse_on_their_objective_config(sft_cli, recipe):
    """Recipes name hub models, so they are parsed (not instantiated) offline."""
    spec = _yaml(recipe)
    base = "dpo.yaml" if spec["model"]["class_path"].endswith("DPOModule") else "sft.yaml"
    parsed = sft_cli.parser.parse_args(["--config", str(CONFIGS / base), "--config", str(recipe)])
    assert parsed.model.class_path == spec["model"]["class_path"]
    assert (
        parsed.model.init_args.model_name_or_path
        == spec["model"]["init_args"]["model_name_or_path"]
    )
    assert parsed.data.init_args.tokenizer == spec["data"]["init_args"]["tokenizer"]
    assert parsed.model.init_args.lora.r == spec["model"]["init_args"]["lora"]["r"]


@pytest.mark.parametrize("name", ["SGD", "Adafactor"])
def test_one_key_swaps_the_optimizer(name):
    cli = cli_main(
        [
            "--config",
            str(CONFIGS / "sft.yaml"),
            "--model.init_args.optimizer",
            f"torch.optim.{name}",
            "--model.init_args.optimizer.init_args.lr",
            "0.5",
        ],
        run=False,
    )
    import torch

    optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    assert type(optimizer) is getattr(torch.optim, name) and optimizer.defaults["lr"] == 0.5


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_every_run_has_the_safety_callbacks(sft_cli):
    from src.callbacks import DivergenceGuard, Preemption

    kinds = {type(c) for c in sft_cli.trainer.callbacks}
    assert {DivergenceGuard, Preemption} <= kinds
    guard = next(c for c in sft_cli.trainer.callbacks if isinstance(c, DivergenceGuard))
    assert guard.action == "stop"
    cli = cli_main(
        ["--config", str(CONFIGS / "sft.yaml"), "--divergence.action", "skip"], run=False
    )
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, DivergenceGuard))
    assert guard.action == "skip"


# ------------------------------------------------------- shared defaults, said once
OBJECTIVES = ("sft.yaml", "dpo.yaml", "pretrain.yaml")


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_configs_do_not_repeat_the_shared_defaults(name):
    from src.cli import DEFAULT_CALLBACKS, DEFAULT_TRAINER

    given = _yaml(CONFIGS / name)
    trainer = given.get("trainer", {})
    repeated = [key for key in DEFAULT_TRAINER if key.split(".", 1)[1] in trainer]
    assert not repeated, f"{name} repeats {repeated}: src/cli.py sets them for every config"
    assert "seed_everything" not in given
    assert "callbacks" not in trainer, f"{name}: append with callbacks+, keep the defaults"
    defaults = {c["class_path"] for c in DEFAULT_CALLBACKS}
    own = {c["class_path"] for c in trainer.get("callbacks+", [])}
    assert not own & defaults


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_gets_the_shared_defaults_and_its_own_callbacks(name):
    cli = cli_main(["--config", str(CONFIGS / name)], run=False)
    trainer = cli.config.trainer
    assert cli.config.seed_everything == 42
    assert (trainer.gradient_clip_val, trainer.num_sanity_val_steps) == (1.0, 0)
    assert (trainer.log_every_n_steps, trainer.check_val_every_n_epoch) == (10, None)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    for shared in ("LearningRate", "ValidateOnStart", "HFExport", "Throughput", "Diagnosis"):
        assert shared in names, (name, shared)
    own = {"sft.yaml": {"SampleGeneration", "PredictionWriter"}, "dpo.yaml": {"SampleGeneration"}}
    assert own.get(name, set()) <= set(names)
    if name == "pretrain.yaml":  # no chat prompts to sample from
        assert "SampleGeneration" not in names


def test_callbacks_without_plus_replace_the_defaults(tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text("trainer:\n  callbacks:\n    - class_path: src.callbacks.ValidateOnStart\n")
    cli = cli_main(["--config", str(CONFIGS / "sft.yaml"), "--config", str(own)], run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "ValidateOnStart" in names and "HFExport" not in names and "Throughput" not in names
