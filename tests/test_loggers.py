"""The logger presets, each run offline for real beside TensorBoard: scalars, hparams, the sample
table and run.json reach W&B (offline run files), MLflow (a local store, read back with its
client), SwanLab (offline mode) and CSV, under the TensorBoard run's name."""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from src.cli import cli_main
from src.errors import ConfigError
from src.loggers import logger_problem, markdown_table, name_runs
from tests.conftest import ROOT
from tests.test_e2e import fit_args

PRESETS = ROOT / "configs" / "logger"
STEPS = 4


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def wandb_run_records(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The config and the history rows of an offline W&B run file, read as W&B writes it:
    protobuf records in 32 KiB blocks of chunks with a 7-byte header (crc, length, type)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, chunks, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunks, pos = chunks + raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            records.append(chunks)
            chunks = b""
    config: dict[str, str] = {}
    history: list[dict[str, str]] = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({u.key: u.value_json for u in record.config.update})
        elif kind == "history":
            history.append(
                {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            )
    return config, history


def test_runs_are_named_after_the_tensorboard_run(tmp_path):
    (tmp_path / "sft" / "version_0").mkdir(parents=True)
    configs = [
        Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(save_dir=str(tmp_path), name="sft", version=None),
        ),
        Namespace(class_path="src.loggers.WandbLogger", init_args=Namespace(project="mine")),
        Namespace(class_path="src.loggers.LocalMLFlowLogger", init_args=Namespace()),
        Namespace(class_path="src.loggers.SwanLabLogger", init_args=Namespace()),
        Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace()),
    ]
    name_runs(configs)
    tb, wandb, mlflow, swanlab, csv_logger = (c.init_args for c in configs)
    assert tb.version == 1  # version_0 exists: the next one, fixed for every logger
    assert (wandb.name, wandb.project) == ("sft/version_1", "mine")  # a project set is kept
    assert (mlflow.experiment_name, mlflow.run_name) == ("sft", "version_1")
    assert (swanlab.project, swanlab.experiment_name) == ("sft", "version_1")
    assert (csv_logger.save_dir, csv_logger.name, csv_logger.version) == (
        str(tmp_path),
        "sft/version_1",
        "csv",
    )


def test_a_tensorboard_logger_alone_is_left_as_it_is(tmp_path):
    configs = [
        Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(save_dir=str(tmp_path), name="sft", version=None),
        )
    ]
    name_runs(configs)
    assert configs[0].init_args.version is None


def test_a_missing_logger_package_is_named_with_its_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    problem = logger_problem("src.loggers.WandbLogger")
    assert problem == (
        "the W&B logger needs the wandb package, which is not installed: "
        "pip install -e '.[loggers]'"
    )
    assert logger_problem("lightning.pytorch.loggers.TensorBoardLogger") is None
    args = fit_args(tmp_path, tmp_path, 1, "--trainer.logger+", str(PRESETS / "wandb.yaml"))
    with pytest.raises(ConfigError, match=r"W&B logger needs the wandb package.*\[loggers\]"):
        cli_main(args[1:], run=False)


def test_markdown_table_escapes_cells():
    table = markdown_table(["a", "b"], [{"a": "x|y", "b": "1\n2"}, {"a": None, "b": [1]}])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1<br>2 |", "| None | [1] |"]


@pytest.mark.slow
@pytest.mark.skipif(
    not installed("wandb", "mlflow", "swanlab"),
    reason="needs the loggers extra: pip install -e '.[loggers]'",
)
def test_every_logger_gets_scalars_hparams_samples_and_the_record(
    tmp_path, monkeypatch, micro_model_dir
):
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = tmp_path / "runs"
    # the presets as they are, writing under this test's runs/ (W&B offline)
    local = {
        "wandb": {"save_dir": str(runs), "offline": True},
        "mlflow": {"tracking_uri": f"file:{runs / 'mlruns'}"},
        "swanlab": {"log_dir": str(runs / "swanlog")},
        "csv": {},
    }
    extra = []
    for name, changes in local.items():
        preset = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
        preset["init_args"].update(changes)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(preset))
        extra += ["--trainer.logger+", str(path)]
    cli_main(fit_args(runs, micro_model_dir, STEPS, *extra))
    run = runs / "sft" / "version_0"
    assert (run / "run.json").exists() and list(run.glob("events.out.tfevents.*"))

    # CSV: in the TensorBoard run's directory
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r.get("train/loss")]) == STEPS
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [
        0,
        2,
    ]  # step 0, and after step 3 (logged at 2, as in test_e2e)
    assert "train/lr" in rows[0] and "train/epoch" in rows[0] and "epoch" not in rows[0]

    # MLflow: read back with its own client
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{runs / 'mlruns'}")
    (found,) = client.search_runs([client.get_experiment_by_name("sft").experiment_id])
    assert found.info.run_name == "version_0"
    assert len(client.get_metric_history(found.info.run_id, "train/loss")) == STEPS
    assert found.data.params["model.class_path"] == "src.modules.SFTModule"
    assert found.data.params["trainer.max_steps"] == str(STEPS)
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"run.json", "config.yaml", "samples", "run"} <= artifacts
    sample_files = client.list_artifacts(found.info.run_id, "samples")
    table = json.loads(
        Path(client.download_artifacts(found.info.run_id, sample_files[0].path)).read_text()
    )
    assert set(table["columns"]) == {"prompt", "reference", "output"}

    # W&B: the offline run's files
    (wandb_run,) = (runs / "wandb").glob("offline-run-*")
    files = wandb_run / "files"
    assert json.loads((files / "version_0" / "run.json").read_text())["subcommand"] == "fit"
    assert (files / "version_0" / "config.yaml").exists()
    assert list((files / "media" / "table").glob("samples_*.table.json"))
    config, history = wandb_run_records(next(wandb_run.glob("run-*.wandb")))
    assert json.loads(config["model.class_path"]) == "src.modules.SFTModule"
    assert len([h for h in history if "train/loss" in h]) == STEPS
    assert len([h for h in history if "val/loss" in h]) == 2

    # SwanLab: the offline run's files
    (swan_run,) = (runs / "swanlog").glob("run-*")
    swan_config = yaml.safe_load((swan_run / "files" / "config.yaml").read_text())
    assert swan_config["model.class_path"]["value"] == "src.modules.SFTModule"
    # the run file, read with SwanLab's own reader (what `swanlab sync` uploads)
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    reader = DataStoreReader()
    reader.open(next(swan_run.glob("run-*.swanlab")))
    scalars = []
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "scalar":
            scalars.append(record.scalar.key)
    assert scalars.count("train/loss") == STEPS and scalars.count("val/loss") == 2
    texts = list((swan_run / "media").rglob("*.txt"))
    assert any("| prompt | reference | output |" in p.read_text() for p in texts)
