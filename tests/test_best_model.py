"""The best checkpoints by val/loss, early stopping on it, and the export of the best one."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.callbacks import HFExport
from src.callbacks.checkpoint import BestCheckpoint, EarlyStop, RunCheckpoint
from src.cli import cli_main
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"
SFT = str(CONFIGS / "sft.yaml")
EARLY_STOPPING = str(CONFIGS / "callbacks" / "early_stopping.yaml")


def callbacks(cli) -> tuple[BestCheckpoint, EarlyStop]:
    [best] = [c for c in cli.trainer.callbacks if isinstance(c, BestCheckpoint)]
    [stop] = [c for c in cli.trainer.callbacks if isinstance(c, EarlyStop)]
    return best, stop


def test_best_and_early_stopping_are_off_by_default():
    cli = cli_main(["--config", SFT], run=False)
    best, stop = callbacks(cli)
    assert best.save_top_k == 0 and best.export is False
    assert (best.monitor, best.mode) == ("val/loss", "min")
    assert best.filename == "best-step={step}-val_loss={val/loss:.4f}"
    assert best.auto_insert_metric_name is False
    assert stop.patience is None and stop.monitor == "val/loss"
    # the periodic checkpointing is the one preemption saves through, as before
    assert [type(c) for c in cli.trainer.checkpoint_callbacks] == [RunCheckpoint, BestCheckpoint]


def test_the_early_stopping_preset_composes_and_its_keys_override():
    cli = cli_main(["--config", SFT, "--config", EARLY_STOPPING], run=False)
    best, stop = callbacks(cli)
    assert stop.patience == 3 and (best.save_top_k, best.export) == (1, True)

    cli = cli_main(
        ["--config", SFT, "--config", EARLY_STOPPING, "--early_stopping.patience", "5",
         "--best.save_top_k", "2"],
        run=False,
    )  # fmt: skip
    best, stop = callbacks(cli)
    assert stop.patience == 5 and (best.save_top_k, best.export) == (2, True)

    cli = cli_main(["--config", SFT, "--early_stopping.patience", "2"], run=False)
    best, stop = callbacks(cli)
    assert stop.patience == 2 and best.save_top_k == 0  # the group alone, no preset


@pytest.mark.parametrize(
    "preset", sorted((CONFIGS / "callbacks").glob("*.yaml")), ids=lambda p: p.name
)
@pytest.mark.parametrize("objective", ["sft.yaml", "dpo.yaml", "pretrain.yaml"])
def test_callback_presets_compose_with_every_objective(preset, objective):
    cli = cli_main(["--config", str(CONFIGS / objective), "--config", str(preset)], run=False)
    best, stop = callbacks(cli)
    given = yaml.safe_load(preset.read_text())
    for key, value in given.get("best", {}).items():
        assert getattr(best, key) == value, key
    for key, value in given.get("early_stopping", {}).items():
        assert getattr(stop, key) == value, key  # min_delta 0.0: Lightning stores -0.0


def test_best_export_alone_keeps_one_and_another_metric_names_its_files():
    cli = cli_main(["--config", SFT, "--best.export", "true"], run=False)
    best, _ = callbacks(cli)
    assert best.save_top_k == 1
    best = BestCheckpoint(save_top_k=2, monitor="val/rewards/accuracies", mode="max")
    assert best.filename == "best-step={step}-val_rewards_accuracies={val/rewards/accuracies:.4f}"


def test_exporting_the_best_without_ranked_checkpoints_fails_before_training():
    cli = cli_main(["--config", SFT], run=False)
    with pytest.raises(ValueError, match="--best.save_top_k 1"):
        HFExport(checkpoint="best").setup(cli.trainer, cli.model, "fit")
    HFExport(checkpoint="last").setup(cli.trainer, cli.model, "fit")


def test_early_stopping_keeps_the_configured_patience_on_resume():
    stop = EarlyStop(patience=4)
    state = EarlyStop(patience=None).state_dict()
    stop.load_state_dict(state)
    assert stop.patience == 4
    with pytest.raises(ValueError, match="patience must be at least 1"):
        EarlyStop(patience=0)


# ------------------------------------------------------------------ a fit that overfits


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, micro_model_dir):
    """lr 0.05, validation after every step: val/loss falls, then rises, so best != last."""
    runs = tmp_path_factory.mktemp("runs")
    max_steps = 16
    args = [
        "fit",
        "--config", SFT,
        "--config", EARLY_STOPPING,
        "--early_stopping.patience", "3",
        "--best.save_top_k", "2",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "1",
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--checkpoint.every_n_train_steps", "100",
        "--model.init_args.model_name_or_path", str(micro_model_dir),
        "--model.init_args.optimizer.init_args.lr", "0.05",
        "--model.init_args.warmup", "0",
        "--data.init_args.batch_size", "4",
        "--data.init_args.max_length", "96",
    ]  # fmt: skip
    cli = cli_main(args)
    run_dir = runs / "sft" / "version_0"
    return cli, run_dir, val_losses(run_dir), max_steps


def val_losses(run_dir: Path) -> list[float]:
    """val/loss of every validation in order: [0] the step-0 baseline, [k] after step k."""
    [path] = glob.glob(str(run_dir / "events.out.tfevents.*"))
    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars("val/loss"), key=lambda e: e.wall_time)]


def expected_stop(losses: list[float], patience: int) -> int | None:
    """The validation at which patience runs out (Lightning's rule, min_delta 0)."""
    best, wait = float("inf"), 0
    for index, loss in enumerate(losses):
        if loss < best:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= patience:
                return index
    return None


def best_files(run_dir: Path) -> dict[int, float]:
    found = {}
    for path in (run_dir / "checkpoints").glob("best-*.ckpt"):
        match = re.fullmatch(r"best-step=(\d+)-val_loss=(\d+\.\d{4})\.ckpt", path.name)
        assert match, path.name
        found[int(match.group(1))] = float(match.group(2))
    return found


@pytest.mark.slow
def test_early_stopping_stops_when_patience_runs_out(overfit_run):
    cli, run_dir, losses, max_steps = overfit_run
    stop = expected_stop(losses, patience=3)
    assert stop is not None and stop < max_steps  # the loss did go up
    # validation k follows optimizer step k, and no validation ran after the stop
    assert len(losses) == stop + 1
    assert cli.trainer.global_step == stop
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == stop


@pytest.mark.slow
def test_the_best_checkpoints_are_those_with_the_lowest_val_loss(overfit_run):
    _, run_dir, losses, _ = overfit_run
    ranked = sorted(range(1, len(losses)), key=lambda step: losses[step])  # step 0: untrained
    found = best_files(run_dir)
    assert set(found) == set(ranked[:2])
    for step, loss in found.items():
        assert loss == pytest.approx(losses[step], abs=1e-4)
        ckpt = torch.load(run_dir / "checkpoints" / f"best-step={step}-val_loss={loss:.4f}.ckpt",
                          weights_only=False)  # fmt: skip
        assert ckpt["global_step"] == step
    assert ranked[0] != len(losses) - 1  # the best is not the last


@pytest.mark.slow
def test_the_export_holds_the_best_checkpoints_weights(overfit_run):
    cli, run_dir, losses, _ = overfit_run
    found = best_files(run_dir)
    step = min(found, key=found.get)
    best = torch.load(
        run_dir / "checkpoints" / f"best-step={step}-val_loss={found[step]:.4f}.ckpt",
        weights_only=False,
    )["state_dict"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    exported = load_file(run_dir / "hf" / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(exported[name], best[f"model.{name}"])
        assert not torch.equal(exported[name], last[f"model.{name}"])
    # the module itself holds the best weights after fit, as Lightning's ckpt_path="best" would
    assert torch.equal(
        cli.model.model.model.embed_tokens.weight, best["model.model.embed_tokens.weight"]
    )
