"""Every shipped YAML parses; top-level configs instantiate without training."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.cli import cli_main
from src.datamodules import SFTDataModule
from src.modules import SFTModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOP_LEVEL = sorted(CONFIGS.glob("*.yaml"))
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))


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
        assert parsed.trainer[key] == value


def test_one_key_swaps_the_optimizer(tmp_path):
    cli = cli_main(
        [
            "--config",
            str(CONFIGS / "sft.yaml"),
            "--model.init_args.optimizer",
            "torch.optim.SGD",
            "--model.init_args.optimizer.init_args.lr",
            "0.5",
        ],
        run=False,
    )
    import torch

    optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.5


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())
