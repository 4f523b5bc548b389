"""Curve diagnosis (``src.diagnose``, the ``Diagnosis`` callback): each case on synthetic
curves, then real fits whose learning rate is clearly too high and clearly too low."""

from __future__ import annotations

import math
import random
import statistics
import subprocess
import sys

import pytest

from src.diagnose import (
    DIAGNOSIS_FILENAME,
    Curves,
    Settings,
    best_checkpoint,
    diagnose,
    find_run,
    main,
    render_markdown,
)
from tests.conftest import ROOT, conversation, write_jsonl
from tests.test_e2e import scalars

SETTINGS = Settings(lr=1e-3, weight_decay=0.0, warmup=30, gradient_clip_val=1.0, max_steps=300,
                    config_file="configs/sft.yaml")  # fmt: skip


def noisy(values, scale=0.01, seed=0):
    rng = random.Random(seed)
    return [v * (1 + scale * rng.uniform(-1, 1)) for v in values]


def curve(values, start=0, every=1):
    return [(start + i * every, v) for i, v in enumerate(values)]


def falling(n=100, start=7.0, end=2.0):
    """A healthy training loss: exponential decay with 1% batch noise."""
    return noisy([end + (start - end) * math.exp(-4 * i / n) for i in range(n)])


def kinds(curves: Curves) -> dict[str, str]:
    return {f.kind: f.severity for f in diagnose(curves)}


def finding(curves: Curves, kind: str):
    return next(f for f in diagnose(curves) if f.kind == kind)


# --------------------------------------------------------------------- synthetic cases


def test_a_falling_loss_with_a_falling_validation_loss_is_healthy():
    curves = Curves.of(
        {"train/loss": curve(falling()), "val/loss": [(0, 7.0), (49, 3.0), (99, 2.2)]},
        settings=SETTINGS,
    )
    assert kinds(curves) == {"healthy": "ok"}
    healthy = finding(curves, "healthy")
    train = falling()
    start, end = statistics.median(train[:10]), statistics.median(train[-10:])  # edge medians
    assert healthy.message.startswith(f"The training loss fell from {start:.4g} to {end:.4g}")
    assert "the validation loss went from 7 to 2.2" in healthy.message


def test_a_rising_loss_is_a_divergence_naming_the_grad_norm_jump_and_a_lower_rate():
    train = noisy([7.0] * 10 + [7.0 + 0.5 * i for i in range(40)])
    grads = [1.0] * 20 + [8.0] + [6.0] * 29
    curves = Curves.of(
        {"train/loss": curve(train), "train/grad_norm": curve(grads),
         "train/lr": curve([1e-3] * 50)},
        settings=SETTINGS,
    )  # fmt: skip
    found = finding(curves, "diverging")
    assert found.severity == "problem"
    assert "rose instead of falling" in found.message
    assert found.evidence["rise_step"] == next(i for i, v in enumerate(train) if v > 7.0 * 1.25)
    # the jump to a higher level: step 20 and those after it, until the level catches up
    assert [j["step"] for j in found.evidence["grad_norm_spikes"]][:2] == [20, 21]
    assert "step 20 (8, 8.0x the level before; learning rate 0.001)" in found.message
    assert any("`--model.init_args.optimizer.init_args.lr 0.0001`" in a for a in found.advice)
    assert any("python train.py lr_find --config configs/sft.yaml" in a for a in found.advice)
    assert "healthy" not in kinds(curves)
    # the validation at step 0 (7.0) is far below the loss logged after the first updates:
    # no gap is reported beside the divergence
    with_val = Curves.of(
        {"train/loss": curve([19.2, 19.5, 74.8, 105.8, 179.6, 168.3], start=9, every=10),
         "val/loss": [(0, 7.093), (49, 171.8)]},
        settings=SETTINGS,
    )  # fmt: skip
    assert kinds(with_val) == {"diverging": "problem"}


def test_a_nan_loss_and_a_stopped_fit_are_a_divergence():
    train = falling(30)
    train[25:] = [float("nan")] * 5
    curves = Curves.of({"train/loss": curve(train)}, settings=SETTINGS,
                       stopped="a non-finite loss at optimizer step 26")  # fmt: skip
    found = finding(curves, "diverging")
    assert found.evidence["nonfinite_steps"] == [25, 26, 27, 28, 29]
    assert "The fit was stopped: a non-finite loss at optimizer step 26." in found.message


def test_a_loss_that_learns_then_climbs_back_is_a_divergence():
    train = falling(60, 7.0, 2.0) + [2.0 + 0.15 * i for i in range(40)]
    found = finding(Curves.of({"train/loss": curve(train)}, settings=SETTINGS), "diverging")
    assert "then climbed back" in found.message
    assert found.evidence["loss_low_step"] < found.evidence["rise_step"]


def test_a_single_spike_is_named_with_its_step():
    train = falling()
    train[60] *= 3
    curves = Curves.of({"train/loss": curve(train, every=10)}, settings=SETTINGS)
    found = finding(curves, "spikes")
    assert found.severity == "warning"
    assert [j["step"] for j in found.evidence["loss_spikes"]] == [600]
    assert "jumped at step 600" in found.message


def test_a_flat_loss_says_the_rate_may_be_too_low_and_suggests_ten_times_more():
    curves = Curves.of({"train/loss": curve(noisy([7.0] * 80, 0.002))}, settings=SETTINGS)
    found = finding(curves, "flat")
    assert found.severity == "problem" and "too low" in found.title
    assert found.advice[0] == (
        "Raise the learning rate (now 0.001): try 0.01, "
        "`--model.init_args.optimizer.init_args.lr 0.01`."
    )
    assert "healthy" not in kinds(curves)


def test_a_slowly_falling_loss_is_a_warning():
    train = noisy([7.0 - 0.004 * i for i in range(100)], 0.001)  # 5.7% over the run
    found = finding(Curves.of({"train/loss": curve(train)}, settings=SETTINGS), "slow")
    assert found.severity == "warning"
    assert 0.05 < found.evidence["drop"] < 0.06
    assert "still falling at the end" in found.message


def test_a_loss_falling_at_a_steady_pace_is_a_rate_too_low():
    # the demo from scratch at lr 1e-6 (train/loss every 10 steps): 11% in 150 steps, linear
    demo = [7.099, 7.089, 7.036, 6.938, 6.9, 6.829, 6.729, 6.613, 6.61, 6.567, 6.483, 6.4,
            6.36, 6.325, 6.214]  # fmt: skip
    curves = Curves.of({"train/loss": curve(demo, start=9, every=10)}, settings=SETTINGS)
    found = finding(curves, "slow")
    assert "steady pace" in found.title and "learning rate may be too low" in found.title
    assert found.advice[0].startswith("Raise the learning rate (now 0.001): try 0.01")
    # a curve that levels off, with the same total drop, is left alone
    levelling = [7.1 - 0.8 * (1 - math.exp(-6 * i / 15)) for i in range(15)]
    assert kinds(Curves.of({"train/loss": curve(levelling)}, settings=SETTINGS)) == {
        "healthy": "ok"
    }


def test_a_reward_run_is_read_by_its_reward_not_its_surrogate_loss():
    """GRPO's loss hovers around 0 and "rises" from a negative start (the demo's did): it is
    no learning curve, and the diagnosis reads the rewards instead; groups that all got the
    same reward are named as the reason a run learns little."""
    loss = curve(noisy([-0.002 + 0.00002 * i for i in range(100)], 0.5), every=10)
    reward = curve(noisy([0.2 + 0.004 * i for i in range(100)]), every=10)
    rising = {"train/loss": loss, "train/reward": reward,
              "val/reward": [(0, 0.48), (499, 0.55), (999, 0.61)],
              "train/frac_reward_zero_std": curve([0.8] * 100, every=10)}  # fmt: skip
    (found,) = diagnose(Curves.of(rising, settings=SETTINGS))
    assert (found.kind, found.severity, found.title) == ("reward", "ok", "The reward rose")
    assert "from 0.48 (step 0) to 0.61 (step 999)" in found.message
    assert found.evidence["zero_std"] == 0.8 and "num_generations" in found.advice[0]
    assert kinds(Curves.of({"train/loss": loss}, settings=SETTINGS)).get("diverging")  # as loss
    falling = dict(rising, **{"val/reward": [(0, 0.5), (999, 0.4)]})
    (found,) = diagnose(Curves.of(falling, settings=SETTINGS))
    assert (found.severity, found.title) == ("warning", "The reward did not rise")
    assert "completions" in found.advice[-1]


def test_a_rising_validation_loss_is_over_fitting_with_the_best_checkpoint():
    # validations after 100, 200, ... optimizer steps are logged at 99, 199, ...
    val = [(0, 7.0), (99, 3.0), (199, 2.5), (299, 2.7), (399, 2.9)]
    curves = Curves.of(
        {"train/loss": curve(falling(400, 7.0, 1.0)), "val/loss": val},
        checkpoints=["last.ckpt", "step=100.ckpt", "step=200.ckpt", "step=300.ckpt"],
        settings=SETTINGS,
    )
    found = finding(curves, "overfitting")
    assert found.severity == "problem" and "from step 199" in found.title
    assert found.evidence["best_checkpoint"] == "step=200.ckpt"
    assert found.advice[0] == "The best weights are those of step 199: `checkpoints/step=200.ckpt`."
    assert any("--early_stopping.patience 3" in a for a in found.advice)


def test_over_fitting_without_a_checkpoint_of_the_best_step_says_how_to_keep_one():
    val = [(0, 7.0), (99, 3.0), (199, 3.2), (299, 3.4)]
    curves = Curves.of({"train/loss": curve(falling(300)), "val/loss": val}, settings=SETTINGS)
    assert "`--best.save_top_k 1`" in finding(curves, "overfitting").advice[0]


def test_best_checkpoint_matches_the_step_the_validation_was_logged_at():
    names = ["best-step=200-val_loss=2.5000.ckpt", "step=200.ckpt", "step=100.ckpt"]
    assert best_checkpoint(names, 199) == "best-step=200-val_loss=2.5000.ckpt"
    assert best_checkpoint(names, 99) == "step=100.ckpt"
    assert best_checkpoint(names, 0) is None  # the untrained weights are never saved


def test_a_large_gap_at_the_start_asks_whether_the_data_match():
    curves = Curves.of(
        {"train/loss": curve(falling(50, 3.0, 2.0)), "val/loss": [(0, 6.0), (49, 5.5)]},
        settings=SETTINGS,
    )
    found = finding(curves, "start_gap")
    assert found.evidence["gap"] == pytest.approx(1.0, abs=0.03)
    assert "the validation loss is" in found.message and "% higher" in found.message


def test_a_validation_loss_above_a_later_training_loss_is_no_gap():
    # ten updates can explain the lower training loss: the demo at lr 0.05 from scratch
    curves = Curves.of(
        {"train/loss": curve(falling(15, 4.7, 3.0), start=9, every=10),
         "val/loss": [(0, 7.093), (49, 3.335), (99, 3.437), (149, 3.051)]},
        settings=SETTINGS,
    )  # fmt: skip
    assert "start_gap" not in kinds(curves)
    later = Curves.of(
        {"train/loss": curve(falling(15, 7.0, 3.0), start=9, every=10), "val/loss": [(0, 3.0)]}
    )
    assert finding(later, "start_gap").evidence["train_step"] == 9  # the training loss higher


def test_low_padding_efficiency_suggests_packing_unless_it_is_on():
    scalars_ = {"train/loss": curve(falling()), "train/padding_efficiency": curve([0.4] * 100)}
    unpacked = finding(Curves.of(scalars_, settings=SETTINGS), "padding")
    assert "60% of the token slots are padding" in unpacked.title
    assert "`--data.init_args.packing true`" in unpacked.advice[0]
    packed = Settings(**{**SETTINGS.__dict__, "packing": True})
    assert "Packing is on" in finding(Curves.of(scalars_, settings=packed), "padding").advice[0]


def test_too_few_points_say_so_and_judge_nothing_else():
    assert kinds(Curves.of({"train/loss": curve([7.0, 6.0, 5.0])})) == {"too_short": "note"}


def test_the_markdown_holds_every_finding_with_its_advice_and_evidence():
    curves = Curves.of({"train/loss": curve(noisy([7.0] * 80, 0.002))}, settings=SETTINGS)
    markdown = render_markdown(diagnose(curves), curves, "runs/sft/version_0")
    assert markdown.startswith("# Diagnosis of runs/sft/version_0\n")
    assert "Steps 0-79, 80 training-loss values, 0 validations, learning rate 0.001." in markdown
    assert "## The training loss is flat: the learning rate may be too low" in markdown
    assert "What to try:" in markdown and "Evidence: `{" in markdown


def test_the_command_says_when_a_directory_holds_no_run(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no training curves in" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 1


# ------------------------------------------------------------------------------ real runs


def fit_with_lr(tmp_path, micro_model_dir, lr: str) -> str:
    """The SFT config on the micro model for 40 steps at learning rate ``lr``, the Diagnosis
    callback its only one (no sample generation: the seconds go to the curves)."""
    rows = [conversation(f"What is {a} + {b}?", str(a + b)) for a in range(8) for b in range(8)]
    data = write_jsonl(tmp_path / "sums.jsonl", rows)
    result = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/sft.yaml",
         "--trainer.accelerator", "cpu", "--trainer.max_steps", "40",
         "--trainer.val_check_interval", "20", "--trainer.log_every_n_steps", "1",
         "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks", "[{class_path: src.callbacks.Diagnosis}]",  # no generation
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
         "--model.init_args.model_name_or_path", str(micro_model_dir),
         "--model.init_args.optimizer.init_args.lr", lr, "--model.init_args.warmup", "0",
         "--data.init_args.train_files", str(data), "--data.init_args.val_files", str(data),
         "--data.init_args.batch_size", "8", "--data.init_args.cache_dir", str(tmp_path / "c")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lr", "title"),
    [
        ("3.0", "## Training diverged: the learning rate is probably too high"),
        ("1e-7", "## The training loss is flat: the learning rate may be too low"),
    ],
)
def test_a_real_fit_with_a_bad_learning_rate_is_diagnosed(tmp_path, micro_model_dir, lr, title):
    """At the end of fit the Diagnosis callback (a default) prints the diagnosis, writes
    diagnosis.md and logs it as TensorBoard text; ``python -m src.diagnose`` says the same."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stdout = fit_with_lr(tmp_path, micro_model_dir, lr)
    run = find_run(tmp_path / "runs" / "sft")
    written = (run / DIAGNOSIS_FILENAME).read_text()
    assert title in written and title in stdout
    assert f"learning rate {float(lr):.2g}" in written
    assert len(scalars(run, "train/loss")) == 40
    (events,) = run.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert "run/diagnosis/text_summary" in accumulator.Tags()["tensors"]
    again = subprocess.run(
        [sys.executable, "-m", "src.diagnose", str(tmp_path / "runs" / "sft"), "--no-write"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0 and title in again.stdout
