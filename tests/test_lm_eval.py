"""lm-evaluation-harness in the loop (``src.callbacks.LMEval``): local tasks written here, the
micro model, one process and two (DDP splits the documents, FSDP2 runs them all on every
process); the accuracy checked against lm-eval's multiple-choice rule computed by hand."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from src.errors import ConfigError
from tests.conftest import ROOT, conversation, write_jsonl
from tests.test_ddp import FSDP, FSDP2, run_command, saved_model_dir  # noqa: F401 (a fixture)
from tests.test_e2e import scalars

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

from src.callbacks.lm_eval import LMEval, metric_name, scores  # noqa: E402

DOCS = [
    {"question": f"What is {a} + {b}?", "choices": [str(a + b + d) for d in (-1, 0, 1, 10)],
     "answer": 1, "target": str(a + b)}
    for a, b in [(3, 4), (12, 9), (25, 30), (7, 8), (41, 2), (16, 16), (5, 60), (33, 11)]
]  # fmt: skip


def write_tasks(folder: Path) -> Path:
    """A multiple-choice task and a generative one over the same local jsonl, as a user
    writes them for lm-eval (``dataset_path: json`` and ``data_files``)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / "sums.jsonl", DOCS)
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{question}}",
        "metadata": {"version": 1.0},
    }
    choice = {
        **common,
        "task": "sums_choice",
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    generate = {
        **common,
        "task": "sums_gen",
        "output_type": "generate_until",
        "doc_to_target": "{{target}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    for spec in (choice, generate):
        (folder / f"{spec['task']}.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return folder


def hand_accuracy(model_dir: Path, tokenizer) -> float:
    """lm-eval's multiple-choice accuracy by its documented rule: each choice is scored by the
    summed log-probability of ``" " + choice`` after the question (the pair encoded whole and
    split at the question's length), and the highest-scoring choice must be the answer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right = 0
    for doc in DOCS:
        context = tokenizer.encode(doc["question"], add_special_tokens=False)
        totals = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(f"{doc['question']} {choice}", add_special_tokens=False)
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].float()
            log_probs = torch.log_softmax(logits, -1)
            positions = range(len(context) - 1, len(whole) - 1)
            totals.append(sum(log_probs[i, whole[i + 1]].item() for i in positions))
        right += int(max(range(len(totals)), key=totals.__getitem__) == doc["answer"])
    return right / len(DOCS)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    rows = [conversation(d["question"], d["target"]) for d in DOCS]
    return write_jsonl(folder / "train.jsonl", rows * 2), write_jsonl(folder / "val.jsonl", rows)


def fit(tmp: Path, model_dir: Path, files, tasks_dir: Path | None, devices=1, *extra) -> Path:
    """The SFT config on the micro model for 4 steps, validated at 0, 2 and 4, with the two
    local tasks evaluated at every validation (none when ``tasks_dir`` is None)."""
    callbacks = [
        {"class_path": "src.callbacks.HFExport"},
        {"class_path": "src.callbacks.ValidateOnStart"},
    ]
    if tasks_dir is not None:
        callbacks.append(
            {
                "class_path": "src.callbacks.LMEval",
                "init_args": {
                    "tasks": ["sums_choice", "sums_gen"],
                    "include_path": str(tasks_dir),
                    "batch_size": 3,
                },
            }
        )
    train, val = files
    run_command(
        devices, "fit", "--config", str(ROOT / "configs" / "sft.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", json.dumps(callbacks),
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--model.init_args.model_name_or_path", str(model_dir),
        "--model.init_args.from_scratch", "false",
        "--data.init_args.train_files", str(train), "--data.init_args.val_files", str(val),
        "--data.init_args.batch_size", str(4 // devices),
        "--data.init_args.cache_dir", str(tmp / "cache"),
        *extra,
    )  # fmt: skip
    return tmp / "runs" / "sft" / "version_0"


@pytest.fixture(scope="module")
def single(tmp_path_factory, saved_model_dir, sft_files, tasks) -> Path:
    return fit(
        tmp_path_factory.mktemp("single"), saved_model_dir, sft_files, tasks, 1,
        "--best.monitor", "eval/sums_choice/acc", "--best.mode", "max", "--best.save_top_k", "1",
    )  # fmt: skip


# ---------------------------------------------------------------------- names and results


def test_metric_names_drop_the_none_filter_and_keep_others():
    assert metric_name("acc,none") == "acc"
    assert metric_name("exact_match,strict-match") == "exact_match/strict-match"
    assert metric_name("acc_norm,none") == "acc_norm"
    assert metric_name("f1,my filter") == "f1/my_filter"


def test_scores_log_groups_by_their_aggregate_and_tags_by_their_tasks():
    # the shape of lm-eval 0.4's results: a group with an aggregate (mmlu), a group without
    # one (its tasks are logged), and a task outside any group
    results = {
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.31, "acc_stderr,none": 0.01},
            "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.25},
            "mmlu_law": {"alias": " - law", "acc,none": 0.35},
            "bundle": {"alias": "bundle"},
            "gsm8k": {
                "exact_match,strict-match": 0.12,
                "exact_match,flexible-extract": 0.2,
                "exact_match_stderr,strict-match": 0.02,
                "alias": "gsm8k",
            },
            "arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.45, "samples": 7},
        },
        "group_subtasks": {
            "mmlu": ["mmlu_anatomy", "mmlu_law"],
            "bundle": ["gsm8k", "arc_easy"],
        },
    }
    assert scores(results) == {
        "eval/mmlu/acc": 0.31,
        "eval/gsm8k/exact_match/strict-match": 0.12,
        "eval/gsm8k/exact_match/flexible-extract": 0.2,
        "eval/arc_easy/acc": 0.5,
        "eval/arc_easy/acc_norm": 0.45,
    }
    assert scores(results, metrics=["acc"]) == {"eval/mmlu/acc": 0.31, "eval/arc_easy/acc": 0.5}


def test_an_unknown_task_is_refused_with_the_local_ones_named(tasks):
    callback = LMEval(tasks=["sums_choise"], include_path=str(tasks))
    with pytest.raises(ConfigError, match="unknown lm-eval task 'sums_choise'") as err:
        callback.setup(SimpleNamespace(callbacks=[]), None, "fit")
    assert "sums_choice" in str(err.value) and "sums_gen" in str(err.value)


def test_bad_settings_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="tasks is empty"):
        LMEval(tasks=[])
    with pytest.raises(ConfigError, match="not a folder"):
        LMEval(tasks=["x"], include_path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="at least 1"):
        LMEval(tasks=["x"], every_n_validations=0)


def test_a_checkpoint_ranked_by_a_score_logged_every_few_validations_is_refused():
    from src.callbacks import BestCheckpoint

    best = BestCheckpoint(monitor="eval/sums_choice/acc", mode="max", save_top_k=1)
    callback = LMEval(tasks=["sums_choice"], every_n_validations=2)
    with pytest.raises(ConfigError, match="every 2 validations"):
        callback._check_monitors(SimpleNamespace(callbacks=[best]))


# --------------------------------------------------------------------------- in a fit


def test_scores_are_logged_at_every_validation_and_match_lm_evals_rule(single, tokenizer):
    choice = scalars(single, "eval/sums_choice/acc")
    generated = scalars(single, "eval/sums_gen/exact_match")
    losses = scalars(single, "val/loss")
    assert [s for s, _ in choice] == [s for s, _ in generated] == [s for s, _ in losses]
    assert len(choice) == 3  # after steps 0, 2 and 4 (logged at 0, 1, 3 as val/loss is)
    assert all(v in {i / len(DOCS) for i in range(len(DOCS) + 1)} for _, v in choice)
    # the last validation saw the final weights, which the export wrote
    assert choice[-1][1] == pytest.approx(hand_accuracy(single / "hf", tokenizer), abs=1e-6)

    record = json.loads((single / "eval.json").read_text())
    assert record["tasks"] == ["sums_choice", "sums_gen"]
    steps = [(e["step"], e["when"]) for e in record["evaluations"]]
    assert steps == [(0, "validation"), (2, "validation"), (4, "validation")]  # none at fit end
    last = record["evaluations"][-1]
    assert last["n-samples"]["sums_choice"]["effective"] == len(DOCS)
    assert last["logged"]["eval/sums_choice/acc"] == pytest.approx(choice[-1][1])
    assert set(last["results"]) == {"sums_choice", "sums_gen"}


def test_the_best_checkpoint_is_ranked_by_the_benchmark_score(single):
    import torch as _torch

    values = dict(scalars(single, "eval/sums_choice/acc")[1:])  # step 0 is never saved
    (best,) = (single / "checkpoints").glob("best-*.ckpt")
    state = _torch.load(best, map_location="cpu", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if "BestCheckpoint" in k)
    assert float(saved["best_model_score"]) == pytest.approx(max(values.values()))
    assert "eval_sums_choice_acc=" in best.name


def test_evaluation_leaves_training_exactly_as_without_it(
    tmp_path, single, saved_model_dir, sft_files
):
    plain = fit(tmp_path, saved_model_dir, sft_files, None, 1)
    assert scalars(plain, "train/loss") == scalars(single, "train/loss")
    assert scalars(plain, "val/loss") == scalars(single, "val/loss")


def test_fit_end_evaluates_the_final_weights_when_no_validation_did(
    tmp_path, saved_model_dir, sft_files, tasks
):
    run = fit(tmp_path, saved_model_dir, sft_files, tasks, 1, "--trainer.max_steps", "3")
    steps = [
        (e["step"], e["when"]) for e in json.loads((run / "eval.json").read_text())["evaluations"]
    ]
    assert steps == [(0, "validation"), (2, "validation"), (3, "fit_end")]
    # at the steps of val/loss and then of the last train/loss
    assert [s for s, _ in scalars(run, "eval/sums_choice/acc")] == [0, 1, 2]
    assert scalars(run, "train/loss")[-1][0] == 2


# ---------------------------------------------------------------------- two processes


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy", ["ddp", pytest.param("fsdp1", marks=pytest.mark.heavy), "fsdp2"]
)
def test_two_processes_score_as_one(strategy, tmp_path, single, saved_model_dir, sft_files, tasks):
    """DDP splits the documents over the processes and gathers them; FSDP runs every document
    on both (each forward a collective, generation in lockstep). Either way the scores of the
    untrained model equal one process's, and both processes log the same numbers."""
    preset = {"ddp": "ddp", "fsdp1": FSDP, "fsdp2": FSDP2}
    strategy_args = ("--trainer.strategy", preset[strategy])
    run = fit(tmp_path, saved_model_dir, sft_files, tasks, 2, *strategy_args)
    for tag in ("eval/sums_choice/acc", "eval/sums_gen/exact_match"):
        assert scalars(run, tag)[0] == scalars(single, tag)[0]
    first = json.loads((run / "eval.json").read_text())["evaluations"][0]
    assert first["n-samples"]["sums_choice"]["effective"] == len(DOCS)
