"""An end-to-end fit of configs/sft.yaml with small limits, and resume from last.ckpt."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from src.cli import cli_main
from src.generation import generate
from tests.conftest import ROOT, conversation, write_jsonl

pytestmark = pytest.mark.slow


VAL_ROWS = 8  # validation conversations of the tests' fits: sample generation's prompts


def demo_head(name: str, rows: int) -> Path:
    """The first ``rows`` rows of the demo file ``name`` (written once, under the ignored
    .cache/), for fits that need real conversations but not all of them."""
    path = ROOT / ".cache" / "tests" / f"{Path(name).stem}_{rows}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = (ROOT / "data" / "demo" / name).read_text(encoding="utf-8")
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text("".join(lines.splitlines(keepends=True)[:rows]), encoding="utf-8")
        partial.replace(path)  # whole or not there, whichever test process writes it
    return path


def small_val_file() -> Path:
    """The demo's first ``VAL_ROWS`` validation conversations: sample generation then
    completes 8 prompts per validation, not 64."""
    return demo_head("sft_val.jsonl", VAL_ROWS)


def fit_args(runs: Path, model_dir: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "sft.yaml"),
        "--data.init_args.val_files",
        str(small_val_file()),
        "--trainer.logger.init_args.save_dir",
        str(runs),
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.val_check_interval",
        "3",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--checkpoint.every_n_train_steps",
        "3",
        "--model.init_args.model_name_or_path",
        str(model_dir),
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.max_length",
        "96",
        *extra,
    ]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    values = []
    for path in sorted(glob.glob(str(run_dir / "events.out.tfevents.*"))):
        acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return values


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, micro_model_dir):
    runs = tmp_path_factory.mktemp("runs")
    cli_main(fit_args(runs, micro_model_dir, 6))
    return runs, runs / "sft" / "version_0"


def test_fit_writes_config_events_checkpoints_and_samples(first_run, micro_model_dir):
    _, run_dir = first_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["class_path"] == "src.modules.SFTModule"
    assert config["model"]["init_args"]["model_name_or_path"] == str(micro_model_dir)
    assert config["trainer"]["max_steps"] == 6

    train_loss = scalars(run_dir, "train/loss")
    assert len(train_loss) == 6 and all(0 < v < 20 for _, v in train_loss)
    assert [s for s, _ in scalars(run_dir, "val/loss")] == [0, 2, 5]  # step 0: untrained
    assert scalars(run_dir, "val/ppl") and scalars(run_dir, "val/token_accuracy")
    for tag in ("train/grad_norm", "train/tokens_seen"):
        assert len(scalars(run_dir, tag)) == 6, tag
    assert {step for step, _ in scalars(run_dir, "train/epoch")} >= set(range(6))
    assert len(scalars(run_dir, "train/lr")) == 6

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    text_tags = acc.Tags()["tensors"]
    # every scalar is grouped (train/, val/): none opens TensorBoard ahead of the losses
    assert all("/" in tag for tag in acc.Tags()["scalars"]), acc.Tags()["scalars"]
    assert any(t.startswith("samples") for t in text_tags)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 3, 6}
    assert all(set(s) == {"step", "prompt", "reference", "output"} for s in samples)

    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step=3.ckpt", "step=6.ckpt"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_hf_export_loads_and_generates_with_plain_transformers(first_run):
    _, run_dir = first_run
    hf = run_dir / "hf"
    assert (hf / "model.safetensors").exists()
    from huggingface_hub import ModelCard

    card = ModelCard.load(hf / "README.md")  # the model card, written with the export
    assert "SFTModule" in card.data.tags and "- optimizer steps: 6" in card.text
    assert "| val/loss |" in card.text and "tokens trained on" in card.text
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    [text] = generate(model, tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}]], 5)
    assert isinstance(text, str)
    ids = tokenizer("What is", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4) or out[0, -1] == tokenizer.eos_token_id


def test_test_subcommand_evaluates_a_checkpoint_without_touching_its_run(
    first_run, micro_model_dir
):
    runs, run_dir = first_run
    before = (run_dir / "config.yaml").read_text()
    args = fit_args(runs, micro_model_dir, 6, "--ckpt_path", str(run_dir / "checkpoints/last.ckpt"))
    args[0] = "test"
    args += ["--trainer.logger.init_args.name", "evaluation"]
    cli = cli_main(args)
    metrics = cli.trainer.callback_metrics
    assert 0 < metrics["test/loss"].item() < 20
    assert metrics["test/ppl"].item() == pytest.approx(
        math.exp(metrics["test/loss"].item()), rel=1e-4
    )
    assert (run_dir / "config.yaml").read_text() == before


def test_predict_writes_completions_of_the_prompts(first_run, micro_model_dir, tmp_path):
    runs, run_dir = first_run
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [conversation("How many words: red fox"), conversation("Uppercase: cat", "CAT")],
    )
    args = fit_args(runs, micro_model_dir, 6, "--ckpt_path", str(run_dir / "checkpoints/last.ckpt"))
    args[0] = "predict"
    args += [
        "--trainer.logger.init_args.name",
        "prediction",
        "--data.init_args.predict_files",
        str(prompts),
        "--model.init_args.max_new_tokens",
        "5",
    ]
    cli_main(args)
    rows = [
        json.loads(line)
        for line in (runs / "prediction" / "version_0" / "predictions.jsonl").open()
    ]
    assert [r["prompt"][-1]["content"] for r in rows] == [
        "How many words: red fox",
        "Uppercase: cat",
    ]
    assert [r["reference"] for r in rows] == ["", "CAT"]
    assert all(isinstance(r["output"], str) for r in rows)


def test_resume_from_last_continues_the_same_run(first_run, micro_model_dir):
    runs, run_dir = first_run
    cli_main(fit_args(runs, micro_model_dir, 8, "--ckpt_path", "last"))
    assert sorted(p.name for p in (runs / "sft").iterdir()) == ["version_0"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 8  # the final step, though not a multiple of every_n_train_steps
    steps = [s for s, _ in scalars(run_dir, "train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 8  # 6 before, 2 after, none repeated
    # no second step-0 baseline on resume
    assert [s for s, _ in scalars(run_dir, "val/loss")] == [0, 2, 5]


def test_bad_data_stops_train_py_with_a_message_not_a_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    good = json.dumps(conversation("hi", "hello"))
    bad.write_text(good + "\n" + '{"messages": [oops\n', encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "fit",
            "--config",
            str(ROOT / "configs" / "sft.yaml"),
            "--data.init_args.train_files",
            str(bad),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        cwd=ROOT,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"data error: {bad}:2: malformed JSON (Expecting value at column 15)"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_process_ddp_fit_prepares_data_once_and_finishes(tmp_path):
    """2 CPU processes (gloo): rank 0 prepares and caches, both train, callbacks write once."""
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "fit",
            "--config",
            str(ROOT / "configs" / "sft.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--data.init_args.packing",
            "true",
            "--data.init_args.batch_size",
            "4",
            "--data.init_args.train_files",
            str(demo_head("sft_train.jsonl", 400)),  # preparing all 8,000 is not the point
            "--data.init_args.val_files",
            str(small_val_file()),
            "--data.init_args.cache_dir",
            str(tmp_path / "cache"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        cwd=ROOT,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    entries = [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and entries[0].startswith("SFTDataModule-")  # prepared once
    # rank 0 prepares and caches (and says so, not "loaded from the cache"); both ranks load
    assert "prepared and cached in" in result.stderr + result.stdout
    run = tmp_path / "runs" / "sft" / "version_0"
    samples = (run / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 8  # steps 0 and 2, eight prompts each, written by rank 0 only
    assert (run / "hf" / "config.json").exists()


def objective_args(config: str, runs: Path, model_dir: Path, *extra: str) -> list[str]:
    """A short fit of another shipped objective config on the micro model."""
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / config),
        "--trainer.logger.init_args.save_dir",
        str(runs),
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "4",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--model.init_args.model_name_or_path",
        str(model_dir),
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.max_length",
        "96",
        *extra,
    ]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_dpo_fit_starts_at_ln2_with_zero_rewards(tmp_path, micro_model_dir, packing):
    extra = ("--data.init_args.packing", "true") if packing else ()
    cli_main(objective_args("dpo.yaml", tmp_path, micro_model_dir, *extra))
    run_dir = tmp_path / "dpo" / "version_0"
    (step0, loss0), *_ = scalars(run_dir, "val/loss")
    assert step0 == 0 and loss0 == pytest.approx(math.log(2), abs=1e-6)
    assert scalars(run_dir, "train/loss")[0][1] == pytest.approx(math.log(2), abs=1e-6)
    efficiency = [v for _, v in scalars(run_dir, "train/padding_efficiency")]
    assert len(efficiency) == 4 and (min(efficiency) > 0.9) == packing, efficiency
    for tag in ("chosen", "rejected", "margins"):
        assert scalars(run_dir, f"val/rewards/{tag}")[0][1] == pytest.approx(0.0, abs=1e-7)
    for tag in ("train/rewards/accuracies", "train/logps/chosen", "val/logps/rejected"):
        assert len(scalars(run_dir, tag)) >= 1, tag
    assert len(scalars(run_dir, "train/loss")) == 4
    assert not any(
        "reference" in k
        for k in torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    )


def test_pretrain_fit_logs_full_blocks(tmp_path, micro_model_dir):
    cli_main(objective_args("pretrain.yaml", tmp_path, micro_model_dir))
    run_dir = tmp_path / "pretrain" / "version_0"
    assert len(scalars(run_dir, "train/loss")) == 4 and scalars(run_dir, "val/ppl")
    assert scalars(run_dir, "train/padding_efficiency")[0][1] == pytest.approx(1.0)


def test_lora_sft_exports_an_adapter_and_a_merged_model_that_agree(tmp_path, micro_model_dir):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoConfig

    base = tmp_path / "base"  # a model with weights, as from the hub
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir)).save_pretrained(
        base
    )
    AutoTokenizer.from_pretrained(micro_model_dir).save_pretrained(base)
    cli_main(
        objective_args(
            "sft.yaml",
            tmp_path,
            base,
            "--config",
            str(ROOT / "configs" / "peft" / "lora.yaml"),
            "--model.init_args.from_scratch",
            "false",
            "--model.init_args.lora.merge",
            "true",
            "--model.init_args.optimizer.init_args.lr",
            "0.01",
        )
    )
    hf = tmp_path / "sft" / "version_0" / "hf"
    assert (hf / "adapter_model.safetensors").exists() and (hf / "merged" / "config.json").exists()
    adapter = AutoPeftModelForCausalLM.from_pretrained(hf).eval()
    merged = AutoModelForCausalLM.from_pretrained(hf / "merged").eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        a, m, b = adapter(ids).logits, merged(ids).logits, plain(ids).logits
    assert torch.allclose(a, m, atol=1e-5)
    assert not torch.allclose(m, b, atol=1e-4)  # the adapters were trained
