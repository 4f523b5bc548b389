"""hf/README.md: the model card written with the export, read back with huggingface_hub."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import yaml
from huggingface_hub import ModelCard

from src.model_card import model_card_text, push_to_hub, write_model_card


@pytest.fixture
def run_dir(tmp_path):
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A base model\n")
    run = tmp_path / "runs" / "dpo" / "version_2"
    run.mkdir(parents=True)
    config = {
        "model": {
            "class_path": "src.modules.DPOModule",
            "init_args": {
                "model_name_or_path": str(base),
                "from_scratch": False,
                "loss_type": "sigmoid",
                "beta": 0.1,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-7}},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
            },
        },
        "data": {"init_args": {"format": "preference", "max_length": 512, "batch_size": 4}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    record = {
        "command": "train.py fit --config configs/dpo.yaml",
        "git": {"commit": "abc123", "dirty": False},
        "precision": "bf16-mixed",
        "world_size": 2,
        "data": {
            "sources": {"train": [{"path": "org/prefs", "hub": True}], "val": []},
            "fingerprints": {"train": "f00d", "val": "beef"},
        },
    }
    (run / "run.json").write_text(json.dumps(record))
    return run


def test_card_states_base_objective_data_steps_metrics_and_command(run_dir):
    metrics = {"val/loss": 0.5123, "eval/arith/acc": 0.75, "train/tokens_seen": 123456.0}
    (run_dir / "hf").mkdir()
    path = write_model_card(run_dir / "hf", run_dir, metrics, 300)
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0"  # the base model's own card
    assert card.data.library_name == "peft"
    assert card.data.datasets == ["org/prefs"]
    assert "DPOModule" in card.data.tags
    text = card.text
    for expected in (
        '- loss_type: `"sigmoid"`',
        "- beta: `0.1`",
        "- lr: `5e-07`",
        "- optimizer steps: 300",
        "- tokens trained on (non-padding): 123,456",
        "| val/loss | 0.5123 |",
        "| eval/arith/acc | 0.7500 |",
        "- train fingerprint: `f00d`",
        "git checkout abc123",
        f"python train.py fit --config {run_dir / 'config.yaml'}",
    ):
        assert expected in text, expected
    assert "train/tokens_seen |" not in text  # a count, not a final metric


def test_license_given_wins_and_scratch_has_no_base_model(run_dir):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["init_args"].update(from_scratch=True, model_name_or_path="org/tiny")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    card = ModelCard(model_card_text(run_dir, {}, 10, license="mit"))
    assert card.data.license == "mit" and card.data.base_model is None
    assert "random initialisation" in card.text and "| (none logged) | |" in card.text


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    # no network here: the Hub client's two calls are recorded instead of sent
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return type("Info", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(tmp_path, "me/model", private=True) == "https://hub/commit/1"
    assert calls[1] == (
        "create_repo",
        "me/model",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert calls[2][1]["folder_path"] == str(tmp_path) and calls[2][1]["repo_id"] == "me/model"
