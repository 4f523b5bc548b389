"""``python train.py lr_find`` and ``scale_batch_size`` (src/tune.py) on the micro model."""

from __future__ import annotations

import importlib.util
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest

from src import tune
from src.cli import cli_main
from tests.conftest import ROOT, conversation, write_jsonl
from tests.test_e2e import scalars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def common(tmp_path_factory, micro_model_dir) -> list[str]:
    """Fit arguments of a tiny SFT run: the micro model, 48 short conversations."""
    tmp = tmp_path_factory.mktemp("tune")
    rows = [
        conversation(
            f"question {i} about {'cats' if i % 2 else 'dogs'}", f"answer {i} " * (1 + i % 5)
        )
        for i in range(48)
    ]
    data = write_jsonl(tmp / "train.jsonl", rows)
    return [
        "--config", str(ROOT / "configs" / "sft.yaml"),
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--model.init_args.model_name_or_path", str(micro_model_dir),
        "--data.init_args.tokenizer", str(micro_model_dir),
        "--data.init_args.train_files", str(data),
        "--data.init_args.val_files", "null",
        "--data.init_args.val_split", "0",
        "--data.init_args.max_length", "64",
        "--data.init_args.cache_dir", str(tmp / "cache"),
    ]  # fmt: skip


def tune_dir(common: list[str]) -> Path:
    return Path(common[common.index("--trainer.logger.init_args.save_dir") + 1]) / "sft" / "tune"


@pytest.fixture
def checkpoints(monkeypatch) -> list[Path]:
    """Where the searches write their temporary checkpoints."""
    saved: list[Path] = []
    save = pl.Trainer.save_checkpoint

    def spy(trainer: pl.Trainer, filepath: str, *args: Any, **kwargs: Any) -> None:
        saved.append(Path(filepath))
        save(trainer, filepath, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", spy)
    return saved


def assert_no_checkpoint_left(saved: list[Path], out: Path, *dirs: Path) -> None:
    """The search's checkpoint went under ``out`` (not the working directory: a killed search
    would leave it there), and is gone."""
    assert saved and all(path.parent == out for path in saved), saved
    for d in (out, *dirs):
        left = [p.name for p in d.iterdir() if p.suffix == ".ckpt"]
        assert not left, f"{d}: {left}"


def test_lr_find_records_the_step_mean_loss_of_a_fit(
    common, tmp_path, monkeypatch, capsys, checkpoints
):
    monkeypatch.chdir(tmp_path)  # Lightning's default root: nothing may be left here
    # 2 rows x 2 micro-batches per step: the loss is the step's mean, not a micro-batch's
    steps = ["--data.init_args.batch_size", "2", "--trainer.accumulate_grad_batches", "2"]
    lr = ["--min_lr", "1e-12", "--max_lr", "1e-11"]  # the weights do not move
    result = tune.main("lr_find", ["--num_training", "14", *lr, *common, *steps])
    printed = capsys.readouterr().out
    out = tune_dir(common)
    assert_no_checkpoint_left(checkpoints, out, tmp_path, ROOT)

    # an ordinary fit on the same data and weights: train/loss of its first steps
    cli_main(["fit", *common, *steps,
              "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0",
              "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.callbacks", "[{class_path: src.callbacks.HFExport}]",
              "--model.init_args.optimizer.init_args.lr", "1e-12",
              "--model.init_args.warmup", "0"])  # fmt: skip
    fit = [v for _, v in scalars(out.parent / "version_0", "train/loss")]
    assert len(fit) == 5
    assert result["loss"][:5] == pytest.approx(fit, rel=1e-5)
    assert abs(fit[0] - math.log(1088)) < 0.2  # untrained: about ln(vocabulary)
    # the running mean is debiased from the first step: it starts at the first loss
    assert result["smoothed_loss"][0] == pytest.approx(result["loss"][0], rel=1e-6)
    assert all(abs(s - fit[0]) < 0.1 for s in result["smoothed_loss"])

    written = json.loads((out / "lr_find.json").read_text())
    assert written["lr"] == pytest.approx(result["lr"]) and len(written["lr"]) == 14
    assert written["loss"] == pytest.approx(result["loss"])
    assert written["lr"][0] == pytest.approx(1e-12) and written["steps_run"] == 14
    suggestion = written["suggestion"]
    assert 1e-12 <= suggestion <= 1e-11
    assert f"Suggested learning rate: {suggestion:.2g}" in printed
    assert f"    --model.init_args.optimizer.init_args.lr {suggestion:.2g}\n" in printed
    assert "[lr_find] step 14/14: lr" in printed  # progress lines, stdout not a terminal
    assert "Finding best initial lr" not in capsys.readouterr().err  # and no bar

    png = (out / "lr_find.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert written["plot"] == "lr_find.png"


def test_smoothing_is_debiased_and_stops_on_divergence():
    trainer = SimpleNamespace(should_stop=False, is_global_zero=True)
    seen = tune.Seen(threshold=2.0)
    for loss in (7.0, 7.0, 7.0):
        seen.note_loss(loss, trainer)
    assert seen.smoothed == pytest.approx([7.0] * 3)  # Lightning's first point was 3.5
    assert not trainer.should_stop
    for loss in (7.0, 1000.0):  # the smoothed loss passes twice its best
        seen.note_loss(loss, trainer)
    assert trainer.should_stop


def test_scale_batch_size_starts_at_init_val(common, tmp_path, monkeypatch, capsys, checkpoints):
    monkeypatch.chdir(tmp_path)
    args = ["--init_val", "2", "--max_trials", "3", "--steps_per_trial", "1"]
    result = tune.main("scale_batch_size", [*args, *common, "--data.init_args.batch_size", "4"])
    printed = capsys.readouterr().out
    out = tune_dir(common)
    assert_no_checkpoint_left(checkpoints, out, tmp_path, ROOT)
    assert result["tried"] == [2, 4, 8]  # not the config's 4 first
    assert result["batch_size"] == 8 and result["config_batch_size"] == 4
    written = json.loads((out / "scale_batch_size.json").read_text())
    assert written["tried"] == [2, 4, 8] and written["batch_size"] == 8
    assert "sizes trained on: 2, 4, 8." in printed
    assert "    --data.init_args.batch_size 8\n" in printed
    assert "not a memory limit" in printed  # a CPU: the trials bound the search


def train_py(monkeypatch, capsys, *args: str) -> tuple[int | str | None, str]:
    """``train.py <args>`` in this process: its exit code (or message) and what it printed."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    captured = capsys.readouterr()
    return exit_.value.code, captured.out + captured.err


@pytest.mark.parametrize(
    ("command", "option"), [("lr_find", "--min_lr"), ("scale_batch_size", "--init_val")]
)
def test_help(monkeypatch, capsys, command, option):
    code, printed = train_py(monkeypatch, capsys, command, "--help")
    assert code == 0
    assert f"usage: python train.py {command}" in printed and option in printed
    assert "Every other argument is a fit argument" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lr_find", "--min_lr", "0"], "config error: lr_find: --min_lr must be above 0"),
        (["scale_batch_size", "--init_val", "0"], "config error: scale_batch_size: --init_val"),
        (
            ["lr_find", "--trainer.strategy", "deepspeed_stage_2", "--trainer.accelerator", "cpu"],
            "config error: the learning-rate and batch-size searches do not run under "
            "DeepSpeedStrategy",
        ),
        (
            ["scale_batch_size", "--trainer.devices", "2", "--trainer.strategy", "ddp",
             "--trainer.accelerator", "cpu"],
            "config error: scale_batch_size runs on one device",
        ),
    ],
)  # fmt: skip
def test_errors_are_one_line(common, monkeypatch, capsys, args, message):
    if "deepspeed_stage_2" in args and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    code, _ = train_py(monkeypatch, capsys, *args, *common)
    assert isinstance(code, str) and code.startswith(message) and "\n" not in code


def test_an_error_is_one_line_from_the_command_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "lr_find", "--max_lr", "1e-9", "--min_lr", "1e-8"],
        capture_output=True, cwd=ROOT, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: lr_find: --min_lr must be above 0 and below --max_lr, got 1e-08 and 1e-09"
    )
    assert "Traceback" not in result.stderr


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a),
    )
    result = {"lr": [1e-5, 1e-4], "loss": [7.0, 6.0], "smoothed_loss": [7.0, 6.5]}
    assert tune.write_plot(result, tmp_path / "lr_find.png") is None
    assert not (tmp_path / "lr_find.png").exists()
    printed = capsys.readouterr().out
    assert "the lr_find plot (lr_find.png) needs the matplotlib package" in printed
    assert "pip install -e '.[plots]'" in printed and "lr_find.json" in printed


def test_suggestion_is_the_steepest_fall_against_log_lr():
    lrs = [10 ** (-8 + 8 * i / 39) for i in range(40)]
    # steepest at 1e-3 on the log axis; against the rate itself, near the tiny rates
    losses = [7 - 3 / (1 + math.exp(-3 * (math.log10(lr) + 3))) for lr in lrs]
    assert 10**-3.2 < tune.suggest(lrs, losses, "exponential") < 10**-2.8
    assert tune.suggest(lrs[:12], losses[:12], "exponential") is None  # the skips leave 1
