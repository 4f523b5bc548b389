"""The dataset registry: named datasets and the mix, in one YAML file."""

from __future__ import annotations

import pytest
import yaml

from src.datamodules import SFTDataModule
from src.datamodules.records import DataError
from src.datamodules.registry import read_registry
from tests.conftest import ASSETS, ROOT, conversation, write_jsonl

DEMO_MIX = ROOT / "configs" / "datasets" / "demo_mix.yaml"


def registry(tmp_path, spec: dict) -> str:
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return str(path)


def test_the_shipped_demo_mix(tmp_path):
    dm = SFTDataModule(tokenizer=str(ASSETS), datasets=str(DEMO_MIX), cache_dir=None)
    dm.setup("fit")
    train, val = dm.stats["train"], dm.stats["val"]
    assert (train.rows, val.rows) == (8000 + 2000, 200)
    assert train.loss_weighted == 2000  # the second entry, at loss_weight 0.5


def test_named_entries_overrides_inline_entries_and_relative_paths(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [conversation("Say a.", "a")] * 5)
    write_jsonl(data / "b.jsonl", [{"question": "Say b.", "answer": "b"}] * 3)
    path = registry(
        tmp_path,
        {
            "datasets": {
                "a": {"path": "data/a.jsonl", "weight": 2},
                "b": {
                    "path": "data/b.jsonl",
                    "format": "prompt_completion",
                    "columns": {"prompt": "question", "completion": "answer"},
                },
            },
            "train": ["a", {"name": "b", "loss_weight": 0.5}],
            "val": [{"path": "data/a.jsonl", "max_rows": 2}, {"path": "HuggingFaceH4/no_robots"}],
        },
    )
    train, val = read_registry(path)
    assert [s.path for s in train] == [str(data / "a.jsonl"), str(data / "b.jsonl")]
    assert (train[0].weight, train[1].loss_weight, train[1].format) == (
        2.0,
        0.5,
        "prompt_completion",
    )
    assert train[1].columns == {"prompt": "question", "completion": "answer"}
    assert val[0].max_rows == 2
    assert val[1].path == "HuggingFaceH4/no_robots"  # nothing there: a hub id, kept as given
    dm = SFTDataModule(tokenizer=str(ASSETS), datasets=path, cache_dir=None, format="auto")
    dm.val_sources = dm.val_sources[:1]
    dm.setup("fit")
    assert (dm.stats["train"].rows, dm.stats["val"].rows) == (8, 2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"train": ["nope"], "datasets": {"a": {"path": "x"}}},
            "no dataset named 'nope' \\(known: a\\)",
        ),
        ({"train": [{"path": "x", "wieght": 2}]}, "unknown option\\(s\\) wieght"),
        ({"train": [{"format": "alpaca"}]}, "no `path`"),
        ({"datasets": {}}, "expected a mapping with a `train` list"),
        ({"train": [], "mix": "concat"}, "unknown key\\(s\\) mix"),
        ({"train": "a"}, "`train` must be a list"),
    ],
)
def test_registry_mistakes_are_named(tmp_path, spec, message):
    with pytest.raises(DataError, match=message):
        read_registry(registry(tmp_path, spec))


def test_a_missing_registry_file_is_named(tmp_path):
    with pytest.raises(DataError, match="dataset registry .*nowhere.yaml: no such file"):
        read_registry(str(tmp_path / "nowhere.yaml"))


def test_the_registry_through_the_command_line():
    import warnings

    from src.cli import cli_main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = cli_main(
            [
                "--config",
                str(ROOT / "configs" / "sft.yaml"),
                "--data.init_args.datasets",
                str(DEMO_MIX),
            ],
            run=False,
        )
    sources = cli.datamodule.train_sources
    assert [s.max_rows for s in sources] == [None, 2000]
    assert sources[0].path.endswith("data/demo/sft_train.jsonl")
