"""A path given to any argument that takes files means the file, never its contents: through
the command line and through YAML, for train, val, predict and prompts files."""

from __future__ import annotations

import json
import warnings

import pytest

from src.callbacks.generation import SampleGeneration
from src.cli import cli_main
from src.datamodules.sft import read_prompts
from tests.conftest import ROOT

ROWS = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(7)]


@pytest.fixture
def files(tmp_path):
    array = tmp_path / "data.json"  # a JSON array: once read as the argument's value, N x N
    array.write_text(json.dumps(ROWS), encoding="utf-8")
    table = tmp_path / "qa.csv"  # a CSV: once read as the value, "File name too long"
    table.write_text(
        "prompt,completion\n" + "".join(f"Say {i}.,{i}\n" for i in range(7)), encoding="utf-8"
    )
    return {"json": str(array), "csv": str(table)}


def parse(args: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli_main(
            [
                "--config",
                str(ROOT / "configs" / "sft.yaml"),
                *args,
                "--data.init_args.cache_dir",
                "null",
            ],
            run=False,
        )


def as_args(how: str, tmp_path, settings: dict) -> list[str]:
    """``settings`` (dotted data keys) as command-line arguments or as a YAML file."""
    if how == "cli":
        return [a for key, value in settings.items() for a in (f"--data.init_args.{key}", value)]
    path = tmp_path / "over.yaml"
    lines = ["data:", "  init_args:"] + [f"    {k}: {v}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["--config", str(path)]


@pytest.mark.parametrize("how", ["cli", "yaml"])
@pytest.mark.parametrize("kind", ["json", "csv"])
def test_train_and_val_files_are_read_once(files, tmp_path, how, kind):
    path = files[kind]
    settings = {"train_files": path, "val_files": path, "format": "auto"}
    cli = parse(as_args(how, tmp_path, settings))
    dm = cli.datamodule
    assert [s.path for s in dm.train_sources] == [path]
    assert [s.path for s in dm.val_sources] == [path]
    dm.setup("fit")
    assert dm.stats["train"].rows == 7  # not 49
    assert dm.stats["val"].rows == 7


@pytest.mark.parametrize("how", ["cli", "yaml"])
@pytest.mark.parametrize("kind", ["json", "csv"])
def test_predict_files_are_paths(files, tmp_path, how, kind):
    path = files[kind]
    dm = parse(as_args(how, tmp_path, {"predict_files": path})).datamodule
    assert dm.predict_files == [path]
    assert len(read_prompts(dm.predict_files)) == 7


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_prompts_file_of_sample_generation_is_a_path(files, tmp_path, kind):
    path = files[kind]
    config = tmp_path / "callbacks.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: src.callbacks.SampleGeneration\n"
        f"      init_args:\n        prompts_file: {path}\n",
        encoding="utf-8",
    )
    cli = parse(["--config", str(config)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SampleGeneration)]
    assert callback.prompts_file == path
    assert len(read_prompts(callback.prompts_file)) == 7
