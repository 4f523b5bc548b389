"""Resuming never clobbers a run: older checkpoints branch, `last` is the newest, and a
config that trains something else is refused by name."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from src.cli import cli_main
from src.resume import ResumeError, compare_configs, plan_resume, resolve_checkpoint
from tests.test_checkpoint_safety import fit_args, global_step


def snapshot(run: Path) -> dict[str, str]:
    """Every file of a run directory and a digest of its bytes."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def record(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.mark.slow
def test_an_older_checkpoint_branches_and_the_finished_run_stays_as_it_was(
    tmp_path, micro_model_dir, caplog
):
    runs = tmp_path
    extra = ()  # the short fit saves step=3.ckpt and step=6.ckpt
    cli_main(fit_args(runs, micro_model_dir, 6, *extra))
    first = runs / "sft" / "version_0"
    assert (first / "hf" / "model.safetensors").exists()
    before = snapshot(first)

    older = first / "checkpoints" / "step=3.ckpt"
    with caplog.at_level("INFO"):
        cli_main(fit_args(runs, micro_model_dir, 8, *extra, "--ckpt_path", str(older)))
    assert snapshot(first) == before  # hf/, config.yaml, run.json, checkpoints: untouched
    branch = runs / "sft" / "version_1"
    assert global_step(branch / "checkpoints" / "last.ckpt") == 8
    assert (branch / "hf" / "model.safetensors").exists()
    origin = record(branch)["resumed_from"]
    assert origin["checkpoint"] == str(older) and origin["step"] == 3
    assert origin["newest_step_of_run"] == 6 and origin["mode"] == "new run"
    assert origin["changed"]["trainer.max_steps"] == {"run": 6, "given": 8}
    assert "whose newest checkpoint is step 6" in caplog.text and str(branch) in caplog.text

    # `last` is the most recently written last.ckpt: the branch's, continued in place
    cli_main(fit_args(runs, micro_model_dir, 10, *extra, "--ckpt_path", "last"))
    assert sorted(p.name for p in (runs / "sft").iterdir()) == ["version_0", "version_1"]
    assert [p.name for p in (branch / "checkpoints").glob("last*")] == ["last.ckpt"]
    assert global_step(branch / "checkpoints" / "last.ckpt") == 10
    latest = record(branch)
    assert latest["resumed_from"]["mode"] == "continued in place"
    assert latest["resumed_from"]["step"] == 8 and len(latest["previous"]) == 1
    assert snapshot(first) == before


@pytest.mark.slow
def test_last_with_another_config_is_refused_naming_the_settings(tmp_path, micro_model_dir):
    cli_main(fit_args(tmp_path, micro_model_dir, 2))
    run = tmp_path / "sft" / "version_0"
    before = snapshot(run)
    changed = (
        "--data.init_args.chat_template",
        "chatml",
        "--model.init_args.optimizer.init_args.lr",
        "0.01",
    )
    with pytest.raises(ResumeError) as refused:
        cli_main(fit_args(tmp_path, micro_model_dir, 4, *changed, "--ckpt_path", "last"))
    message = str(refused.value)
    assert "data.init_args.chat_template: null (run) -> chatml (given)" in message
    assert (
        "model.init_args.optimizer.init_args.lr" in message and "trainer.max_steps" not in message
    )
    assert (
        "--allow_changes '[data.init_args.chat_template,model.init_args.optimizer.init_args.lr]'"
        in message
    )
    assert snapshot(run) == before

    allow = ("--allow_changes", "[data.init_args.chat_template, model.init_args.optimizer]")
    cli_main(fit_args(tmp_path, micro_model_dir, 3, *changed, *allow, "--ckpt_path", "last"))
    assert global_step(run / "checkpoints" / "last.ckpt") == 3
    assert set(record(run)["resumed_from"]["changed"]) == {
        "data.init_args.chat_template",
        "model.init_args.optimizer.init_args.lr",
        "trainer.max_steps",
        "trainer.val_check_interval",
    }


# -- the decisions on their own, on runs laid out by hand ------------------------------------


def fake_run(experiment: Path, version: int | str, steps: dict[str, int], config: dict) -> Path:
    """``version_N`` (or a named run) with checkpoint files holding only their step, written
    in dict order."""
    run = experiment / (f"version_{version}" if isinstance(version, int) else version)
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for i, (name, step) in enumerate(steps.items()):
        path = run / "checkpoints" / name
        torch.save({"global_step": step}, path)
        order = version if isinstance(version, int) else 100
        os.utime(path, ns=(10**18 + order * 10**12 + i * 10**9,) * 2)
    return run


CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_steps": 100, "accumulate_grad_batches": 1, "logger": {"version": None}},
    "model": {"class_path": "src.modules.SFTModule", "init_args": {"lr": 1e-3}},
    "data": {"init_args": {"packing": False, "num_workers": 0}},
    "checkpoint": {"every_n_train_steps": 50},
    "ckpt_path": None,
}


def changed(config: dict, **keys) -> dict:
    out = json.loads(json.dumps(config))
    for dotted, value in keys.items():
        *parents, leaf = dotted.split("__")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def test_the_newest_checkpoint_continues_and_an_older_one_branches(tmp_path):
    exp = tmp_path / "sft"
    run = fake_run(exp, 0, {"step=50.ckpt": 50, "step=100.ckpt": 100, "last.ckpt": 100}, CONFIG)
    ckpts = run / "checkpoints"
    for name, version in (("last.ckpt", 0), ("step=100.ckpt", 0), ("step=50.ckpt", None)):
        plan = plan_resume(str(ckpts / name), exp, CONFIG)
        assert plan.version == version, name
        assert plan.newest_step == 100
    assert plan.step == 50 and plan.record()["mode"] == "new run"


def test_last_is_the_most_recently_written_last_checkpoint(tmp_path):
    exp = tmp_path / "sft"
    fake_run(exp, 0, {"last.ckpt": 100}, CONFIG)
    fake_run(exp, 1, {"last.ckpt": 30}, CONFIG)
    newest = fake_run(exp, 2, {}, CONFIG) / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 7}, newest)  # written now: later than the others
    assert resolve_checkpoint("last", exp) == (str(newest), 2)
    # a stale last-v1.ckpt left by older versions of the template is a candidate too
    stale = exp / "version_0" / "checkpoints" / "last-v1.ckpt"
    torch.save({"global_step": 120}, stale)
    later = newest.stat().st_mtime_ns + 10**9  # beyond the file clock's granularity
    os.utime(stale, ns=(later, later))
    assert resolve_checkpoint("last", exp) == (str(stale), 0)


def test_resumable_settings_pass_and_training_settings_are_refused():
    allowed_only = changed(
        CONFIG,
        trainer__max_steps=200,
        data__init_args__num_workers=4,
        checkpoint__every_n_train_steps=10,
        ckpt_path="last",
    )
    refused, allowed = compare_configs(CONFIG, allowed_only)
    assert refused == {}
    assert set(allowed) == {
        "trainer.max_steps",
        "data.init_args.num_workers",
        "checkpoint.every_n_train_steps",
    }
    other = changed(
        CONFIG,
        seed_everything=1,
        trainer__accumulate_grad_batches=4,
        data__init_args__packing=True,
        model__class_path="src.modules.DPOModule",
    )
    refused, _ = compare_configs(CONFIG, other)
    assert set(refused) == {
        "seed_everything",
        "trainer.accumulate_grad_batches",
        "data.init_args.packing",
        "model.class_path",
    }
    refused, allowed = compare_configs(CONFIG, other, allow=["data.init_args", "seed_everything"])
    assert set(refused) == {"trainer.accumulate_grad_batches", "model.class_path"}
    assert set(allowed) == {"data.init_args.packing", "seed_everything"}
    # an option the run's config does not have (added to the code since) is not compared
    newer = changed(CONFIG, model__init_args={"lr": 1e-3, "label_smoothing": 0.0})
    assert compare_configs(CONFIG, newer) == ({}, {})


def test_a_refused_last_names_the_newest_run_that_matches(tmp_path):
    exp = tmp_path / "sft"
    fake_run(exp, 0, {"last.ckpt": 100}, CONFIG)
    debug = changed(CONFIG, data__init_args__packing=True)
    fake_run(exp, 1, {"last.ckpt": 4}, debug)  # the newest: a debug run under another config
    with pytest.raises(ResumeError, match="data.init_args.packing: true .run. -> false") as err:
        plan_resume("last", exp, CONFIG)
    assert f"--ckpt_path {exp / 'version_0' / 'checkpoints' / 'last.ckpt'}" in str(err.value)


def test_a_named_run_continues_from_its_newest_and_refuses_an_older_one(tmp_path):
    exp = tmp_path / "dpo_grid"
    run = fake_run(exp, "ipo-beta0.5", {"step=50.ckpt": 50, "last.ckpt": 100}, CONFIG)
    plan = plan_resume("last", exp, CONFIG, version="ipo-beta0.5")
    assert plan.continues and plan.version == "ipo-beta0.5" and plan.step == 100
    older = str(run / "checkpoints" / "step=50.ckpt")
    with pytest.raises(ResumeError, match="would replace its files"):
        plan_resume(older, exp, CONFIG, version="ipo-beta0.5")
    plan = plan_resume(older, exp, CONFIG)  # no version given: the next version_N
    assert plan.version is None and not plan.continues
    assert plan_resume(older, exp, CONFIG, version="ipo-from-50").version == "ipo-from-50"
