"""What a run records: run.json (commit, versions, command line, data fingerprints), the
config as TensorBoard hparams and text, and the command-line overrides in config.yaml."""

from __future__ import annotations

import glob
import importlib.util
import json
import platform
import shlex
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

from src.callbacks.run_record import (
    flatten_config,
    git_state,
    package_versions,
    session_start_summary,
)
from src.callbacks.run_record import write_record as write_run_record
from src.cli import cli_main
from src.datamodules.sources import fingerprint
from tests.conftest import ROOT

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def test_flatten_config_gives_dotted_scalar_hparams():
    config = {
        "seed_everything": 42,
        "trainer": {"max_steps": 5, "callbacks": [{"class_path": "X", "init_args": {"a": 1}}]},
        "model": {
            "class_path": "src.modules.DPOModule",
            "init_args": {"beta": 0.1, "lora": None, "compile": False, "columns": {}},
        },
        "data": {"init_args": {"train_files": ["a.jsonl", "b.jsonl"], "packing": True}},
    }
    assert flatten_config(config) == {
        "seed_everything": 42,
        "trainer.max_steps": 5,
        "trainer.callbacks": '[{"class_path": "X", "init_args": {"a": 1}}]',
        "model.class_path": "src.modules.DPOModule",
        "model.init_args.beta": 0.1,
        "model.init_args.lora": "null",
        "model.init_args.compile": False,
        "model.init_args.columns": "{}",
        "data.init_args.train_files": '["a.jsonl", "b.jsonl"]',
        "data.init_args.packing": True,
    }


def test_session_start_keeps_types():
    summary = session_start_summary({"a": True, "b": 3, "c": 0.5, "d": "x"})
    [value] = summary.value
    assert value.tag == hp_metadata.SESSION_START_INFO_TAG
    hparams = _session_hparams(value.metadata.plugin_data.content)
    assert hparams == {"a": True, "b": 3.0, "c": 0.5, "d": "x"}
    assert isinstance(hparams["a"], bool)  # not 1.0, as torch's own hparams() makes it


@needs_git
def test_git_state_reads_the_commit_and_sees_changes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.txt").write_text("one\n")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=repo, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    git("init", "-q")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    clean = git_state(repo)
    assert clean == {"commit": git("rev-parse", "HEAD"), "dirty": False}

    (repo / "a.txt").write_text("two\n")
    changed = git_state(repo)
    assert changed["commit"] == clean["commit"] and changed["dirty"] is True
    assert changed["changes"] == [" M a.txt"]

    git("checkout", "-q", "a.txt")
    (repo / "new.py").write_text("x = 1\n")
    assert git_state(repo)["dirty"] is True  # an untracked file is part of what ran
    (repo / ".gitignore").write_text("new.py\n.gitignore\n")
    assert git_state(repo)["dirty"] is False  # ignored files are not


def test_git_state_is_unknown_outside_a_repository_or_without_git(tmp_path, monkeypatch):
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_state(outside) == {"commit": "unknown", "dirty": "unknown"}
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert git_state(ROOT) == {"commit": "unknown", "dirty": "unknown"}


def test_package_versions_are_the_imported_modules():
    import datasets
    import lightning
    import peft
    import tokenizers
    import torch
    import torchmetrics
    import transformers

    versions = package_versions()
    assert versions["python"] == platform.python_version()
    for module in (torch, lightning, transformers, datasets, peft, torchmetrics, tokenizers):
        assert versions[module.__name__] == module.__version__
    for optional in ("deepspeed", "bitsandbytes", "liger_kernel"):
        assert (optional in versions) == (importlib.util.find_spec(optional) is not None)


def test_write_record_keeps_earlier_records_of_a_resumed_run(tmp_path):
    path = tmp_path / "run.json"
    write_run_record(path, {"subcommand": "fit", "ckpt_path": None})
    write_run_record(path, {"subcommand": "fit", "ckpt_path": "last.ckpt"})
    write_run_record(path, {"subcommand": "fit", "ckpt_path": "last.ckpt", "n": 3})
    record = json.loads(path.read_text())
    assert record["n"] == 3
    assert [r["ckpt_path"] for r in record["previous"]] == [None, "last.ckpt"]
    assert all("previous" not in r for r in record["previous"])
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left


# ------------------------------------------------------------------ a CLI fit, end to end


def cli_args(runs: Path, model_dir: Path, subcommand: str = "fit", *extra: str) -> list[str]:
    return [
        subcommand,
        "--config",
        str(ROOT / "configs" / "sft.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(runs),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--model.init_args.model_name_or_path",
        str(model_dir),
        "--data.init_args.max_length",
        "96",
        *extra,
    ]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, micro_model_dir):
    """A 2-step fit started as ``train.py`` starts it: from sys.argv, in the project root."""
    runs = tmp_path_factory.mktemp("runs")
    argv = [
        "train.py",
        *cli_args(runs, micro_model_dir),
        "--data.init_args.batch_size",
        "3",
        "--model.init_args.optimizer.init_args.lr",
        "0.0123",
        "--trainer.logger.init_args.name",
        "my run",  # quoted in the command line
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        patch.setattr(sys, "argv", argv)
        cli = cli_main()
        git_commit = _git("rev-parse", "HEAD")
        git_dirty = bool(_git("status", "--porcelain")) if git_commit else "unknown"
    return cli, runs / "my run" / "version_0", argv, git_commit or "unknown", git_dirty


def _git(*args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.mark.slow
def test_run_json_records_code_versions_command_and_data(recorded_run):
    cli, run_dir, argv, git_commit, git_dirty = recorded_run
    record = json.loads((run_dir / "run.json").read_text())
    assert record["subcommand"] == "fit"
    assert record["command"] == shlex.join(argv)
    assert "'my run'" in record["command"]
    assert record["args"] == argv[1:]
    assert record["git"]["commit"] == git_commit
    assert record["git"]["dirty"] == git_dirty
    assert record["versions"] == package_versions()
    assert record["hostname"] == socket.gethostname()
    assert record["world_size"] == 1 and record["num_nodes"] == 1
    started = datetime.fromisoformat(record["start_time"])
    assert timedelta(0) <= datetime.now().astimezone() - started < timedelta(hours=1)
    assert record["ckpt_path"] is None

    data = cli.datamodule
    assert record["data"]["class"] == "src.datamodules.sft.SFTDataModule"
    assert record["data"]["cache_key"] == data.cache_path.name
    assert record["data"]["fingerprints"] == {
        "train": fingerprint(data.train_sources, data.cache_dir),
        "val": fingerprint(data.val_sources, data.cache_dir),
    }
    assert [s["path"] for s in record["data"]["sources"]["train"]] == ["data/demo/sft_train.jsonl"]


@pytest.mark.slow
def test_config_yaml_holds_the_command_line_overrides(recorded_run):
    _, run_dir, *_ = recorded_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.0123
    assert config["data"]["init_args"]["batch_size"] == 3
    assert config["trainer"]["max_steps"] == 2
    assert config["trainer"]["logger"]["init_args"]["name"] == "my run"
    assert config["model"]["class_path"] == "src.modules.SFTModule"  # and the config file's


@pytest.mark.slow
def test_tensorboard_has_one_hparams_session_of_the_whole_config(recorded_run):
    _, run_dir, *_ = recorded_run
    sessions, tags = [], set()
    for path in glob.glob(str(run_dir / "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                tags.add(value.tag)
                if value.tag == hp_metadata.SESSION_START_INFO_TAG:
                    sessions.append(_session_hparams(value.metadata.plugin_data.content))
    assert len(sessions) == 1  # Lightning's module-only session is not written as well
    assert hp_metadata.EXPERIMENT_TAG not in tags  # TensorBoard unites all runs' keys
    assert "hp_metric" not in tags
    hparams = sessions[0]
    assert hparams["model.init_args.optimizer.init_args.lr"] == 0.0123
    assert hparams["data.init_args.batch_size"] == 3.0
    assert hparams["trainer.max_steps"] == 2.0
    assert hparams["trainer.logger.init_args.name"] == "my run"
    assert hparams["data.init_args.packing"] is False
    assert hparams["data.init_args.chat_template"] == "null"
    assert hparams["model.class_path"] == "src.modules.SFTModule"
    assert hparams["data.init_args.train_files"] == "data/demo/sft_train.jsonl"
    assert json.loads(hparams["trainer.callbacks"])[0]["class_path"].endswith("LearningRate")
    assert "val/loss" in tags  # the HPARAMS table's metric column
    hparams_yaml = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams_yaml["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.0123

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    config_text = acc.Tensors("run/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.0123" in config_text
    record_text = acc.Tensors("run/record/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"subcommand": "fit"' in record_text


@pytest.mark.slow
def test_validate_writes_its_own_record(recorded_run, micro_model_dir):
    _, run_dir, *_ = recorded_run
    runs = run_dir.parent.parent
    last = str(run_dir / "checkpoints" / "last.ckpt")
    args = cli_args(
        runs, micro_model_dir, "validate", "--trainer.logger.init_args.name", "eval",
        "--ckpt_path", last,
    )  # fmt: skip
    cli_main(args)
    record = json.loads((runs / "eval" / "version_0" / "run.json").read_text())
    assert record["subcommand"] == "validate" and record["args"] == args
    assert record["ckpt_path"] == last
    assert (runs / "eval" / "version_0" / "config.yaml").exists()
    assert json.loads((run_dir / "run.json").read_text())["subcommand"] == "fit"


def _session_hparams(content: bytes) -> dict:
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    result = {}
    for name, value in data.session_start_info.hparams.items():
        result[name] = getattr(value, value.WhichOneof("kind"))
    return result
