"""Sample generation (prompts, a prompts file, metrics) and ``predict`` (order, ids, output)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torchmetrics.functional.text import bleu_score
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from src.callbacks import SampleGeneration
from src.callbacks.generation import generation_metrics
from src.cli import cli_main
from src.datamodules import DataError, SFTDataModule
from src.datamodules.sft import read_prompts
from src.generation import generate
from src.modules import SFTModule
from tests.conftest import ASSETS, ROOT, conversation, write_jsonl

PROMPT_ROWS = [
    {"id": "a", **conversation("What is 2 + 3?", "5")},
    {"id": 7, "prompt": "Uppercase: cat"},  # a prompt alone
    {
        "conversations": [
            {"from": "human", "value": "Reverse: red fox"},
            {"from": "gpt", "value": "fox red"},
        ]
    },
    {"instruction": "Sort: 3 1 2", "output": "1 2 3"},
    {"prompt": "Count: a b", "completion": "2"},
]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------ prompts
def test_prompts_file_rows_become_prompts_with_references(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    rows = read_prompts(str(path))
    assert rows == [
        (user("What is 2 + 3?"), "5", "a"),
        (user("Uppercase: cat"), "", 7),
        (user("Reverse: red fox"), "fox red", None),
        (user("Sort: 3 1 2"), "1 2 3", None),
        (user("Count: a b"), "2", None),
    ]
    # multi-turn: the last assistant turn is the reference, earlier ones stay in the prompt
    multi = write_jsonl(tmp_path / "multi.jsonl", [conversation("hi", "hello", "bye", "ciao")])
    [(prompt, reference, _)] = read_prompts(str(multi))
    assert [m["content"] for m in prompt] == ["hi", "hello", "bye"] and reference == "ciao"

    callback = SampleGeneration(prompts_file=str(path))
    callback.setup(None, SFTModule.__new__(SFTModule), "fit")
    assert callback.fixed_samples() == [(p, r) for p, r, _ in rows]
    # prompts from the config come first, without references
    config = SampleGeneration(prompts=["hello", user("hey")], prompts_file=str(path))
    config.setup(None, SFTModule.__new__(SFTModule), "fit")
    assert config.fixed_samples() == [(user("hello"), ""), (user("hey"), "")]


def test_a_bad_or_empty_prompts_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no prompts in .*empty.jsonl"):
        read_prompts(str(empty))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "hi"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: cannot tell the format"):
        SampleGeneration(prompts_file=str(bad)).setup(None, SFTModule.__new__(SFTModule), "fit")


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown metrics \\['bleurt'\\]"):
        SampleGeneration(metrics=["exact_match", "bleurt"])
    with pytest.raises(ValueError, match="top_p must be in"):
        SampleGeneration(top_p=0.0)


class Completes(pl.LightningModule):
    """A stand-in for the module: records the arguments of ``complete``."""

    def __init__(self, with_top_p: bool) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        if with_top_p:
            self.complete = self._complete_top_p

    def complete(self, prompts, max_new_tokens, do_sample=False, temperature=1.0):
        self.calls.append((len(prompts), max_new_tokens, do_sample, temperature))
        return [p[-1]["content"].upper() for p in prompts]

    def _complete_top_p(
        self, prompts, max_new_tokens, do_sample=False, temperature=1.0, top_p=None
    ):
        self.calls.append((len(prompts), max_new_tokens, do_sample, temperature, top_p))
        return [p[-1]["content"].upper() for p in prompts]


def test_top_p_and_batches_reach_complete():
    module = Completes(with_top_p=True)
    callback = SampleGeneration(do_sample=True, temperature=0.7, top_p=0.9, batch_size=2)
    callback.setup(None, module, "fit")
    outputs = callback._complete(module, [user(t) for t in "abcde"])
    assert outputs == list("ABCDE")
    assert module.calls == [
        (2, 48, True, 0.7, 0.9),
        (2, 48, True, 0.7, 0.9),
        (1, 48, True, 0.7, 0.9),
    ]
    # without top_p, the four arguments every module's complete() takes
    plain = Completes(with_top_p=False)
    SampleGeneration(batch_size=8)._complete(plain, [user("x")])
    assert plain.calls == [(1, 48, False, 1.0)]
    with pytest.raises(ValueError, match="top_p needs Completes.complete\\(\\) to take"):
        SampleGeneration(top_p=0.9).setup(None, plain, "fit")


def test_top_p_keeps_only_the_likeliest_token(micro_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_model_dir)
    prompts = [user("What is 2 + 3?"), user("Uppercase: cat")]
    greedy = generate(model, tokenizer, prompts, 6)
    torch.manual_seed(1)
    nucleus = generate(model, tokenizer, prompts, 6, do_sample=True, temperature=1.0, top_p=1e-6)
    assert nucleus == greedy
    torch.manual_seed(1)
    sampled = generate(model, tokenizer, prompts, 6, do_sample=True, temperature=5.0)
    assert sampled != greedy  # a random model at a high temperature: sampling does sample


# ------------------------------------------------------------------ metrics
def test_exact_match_compares_stripped_strings():
    scores = generation_metrics([" 5\n", "CAT", "fox red ", "x"], ["5", "cat", "fox red", " x"])
    assert scores == {"exact_match": 0.75, "bleu": scores["bleu"], "rouge_l": scores["rouge_l"]}
    assert generation_metrics(["a"], ["a"], ["exact_match"]) == {"exact_match": 1.0}
    assert generation_metrics([], [], ["exact_match"]) == {}


def test_bleu_is_corpus_bleu4_computed_by_hand():
    output, reference = "the cat sat on the mat", "the cat sat on a mat"
    # clipped n-gram precisions: 1-grams 5/6 (the second "the" is clipped), 2-grams 3/5,
    # 3-grams 2/4, 4-grams 1/3; equal lengths: no brevity penalty
    by_hand = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    [score] = generation_metrics([output], [reference], ["bleu"]).values()
    assert score == pytest.approx(by_hand, abs=1e-6)
    assert score == pytest.approx(float(bleu_score([output], [[reference]])), abs=1e-7)
    assert generation_metrics(["4"], ["5"], ["bleu"]) == {"bleu": 0.0}


def test_rouge_l_is_the_lcs_f1_by_hand():
    # LCS of "the cat sat on the mat" and "the cat is on the mat": the cat on the mat (5)
    scores = generation_metrics(
        ["the cat sat on the mat", "The Cat.", "b a", "", "猫 が 座った"],
        ["the cat is on the mat", "the cat", "a b c", "x", "猫 が 座った"],
        ["rouge_l"],
    )
    p1 = r1 = 5 / 6
    f1 = 2 * p1 * r1 / (p1 + r1)
    f3 = 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)  # LCS 1 of 2 output and 3 reference words
    expected = (f1 + 1.0 + f3 + 0.0 + 1.0) / 5  # case and punctuation ignored; any script
    assert scores["rouge_l"] == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------- metrics in a fit
class Recorder(Logger):
    """Keeps every logged metric with its step."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))

    def steps_of(self, name: str) -> list[tuple[int, float]]:
        return [(s, m[name]) for s, m in self.logged if name in m]


def test_a_fit_logs_generation_metrics_at_every_validation(tmp_path, micro_model_dir):
    from src.callbacks import ValidateOnStart

    rows = [
        conversation("What is 2 + 3?", "5"),
        conversation("Reverse the words: red fox", "fox red"),
        conversation("Uppercase: blue bird", "BLUE BIRD"),
        conversation("Sort these numbers: 9 4 7", "4 7 9"),
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows * 2)
    val = write_jsonl(tmp_path / "val.jsonl", rows)
    pl.seed_everything(0)
    data = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files=str(train),
        val_files=str(val),
        batch_size=4,
        cache_dir=None,
        max_length=64,
    )
    module = SFTModule(model_name_or_path=str(micro_model_dir), from_scratch=True)
    generation = RecordingGeneration(
        num_samples=2,
        max_new_tokens=3,
        metrics=["exact_match", "bleu", "rouge_l"],
        num_metric_samples=3,
        batch_size=2,
    )
    logger = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        val_check_interval=2,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ValidateOnStart(), generation],
    )
    trainer.fit(module, data)
    validations = [s for s, _ in logger.steps_of("val/loss")]
    assert len(validations) == 3  # at the start, after steps 2 and 4
    for name in ("exact_match", "bleu", "rouge_l"):
        logged = logger.steps_of(f"val/gen/{name}")
        assert [s for s, _ in logged] == validations, name
        assert all(0.0 <= v <= 1.0 for _, v in logged), logged
    assert "val/gen/exact_match" in trainer.callback_metrics  # monitorable
    # one generation per validation, for the 3 scored prompts (the 2 shown among them), in
    # batches of 2; the logged values score those outputs against their references
    references = [r["messages"][-1]["content"] for r in rows[:3]]
    assert [[len(b) for b in batches] for batches, _ in generation.calls] == [[2, 1]] * 3
    for k, (_, outputs) in enumerate(generation.calls):
        expected = generation_metrics(outputs, references, ["exact_match", "bleu", "rouge_l"])
        for name, value in expected.items():
            assert logger.steps_of(f"val/gen/{name}")[k][1] == pytest.approx(value), name


class RecordingGeneration(SampleGeneration):
    """Keeps the prompt batches and the outputs of each validation's generation."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[list[list], list[str]]] = []

    def _complete(self, pl_module, prompts):
        batches = []
        original = pl_module.complete

        def complete(chunk, *args):
            batches.append(chunk)
            return original(chunk, *args)

        pl_module.complete = complete
        try:
            outputs = super()._complete(pl_module, prompts)
        finally:
            del pl_module.complete
        self.calls.append((batches, outputs))
        return outputs


# ----------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, micro_model_dir) -> Path:
    """A model with weights and its tokenizer, written by ``save_pretrained`` like ``hf/``."""
    path = tmp_path_factory.mktemp("export") / "hf"
    torch.manual_seed(0)
    # larger initial weights than the default: answers differ from prompt to prompt
    config = AutoConfig.from_pretrained(micro_model_dir, initializer_range=0.2)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(micro_model_dir).save_pretrained(path)
    return path


def predict_args(hf: Path, prompts: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--config",
        str(ROOT / "configs" / "sft.yaml"),
        "--model.init_args.model_name_or_path",
        str(hf),
        "--model.init_args.from_scratch",
        "false",
        "--data.init_args.tokenizer",
        str(hf),
        "--data.init_args.predict_files",
        str(prompts),
        "--data.init_args.val_batch_size",
        "2",
        "--model.init_args.max_new_tokens",
        "4",
        "--trainer.logger.init_args.save_dir",
        str(runs),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected_predictions(hf: Path, prompts: Path, batches: list[list[int]]) -> list[dict]:
    """Rows predicted by hand, greedy, from the export, with the same batches (padding)."""
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    rows = read_prompts(str(prompts))
    outputs = {}
    for batch in batches:
        texts = generate(model, tokenizer, [rows[i][0] for i in batch], 4)
        outputs.update(zip(batch, texts, strict=True))
    return [
        ({"id": i} if i is not None else {}) | {"prompt": p, "reference": r, "output": outputs[n]}
        for n, (p, r, i) in enumerate(rows)
    ]


@pytest.mark.slow
def test_predict_from_an_hf_export_writes_each_prompt_once_in_order(tmp_path, hf_export):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    runs = tmp_path / "runs"
    cli = cli_main(predict_args(hf_export, prompts, runs))
    assert cli.trainer.num_predict_batches == [3]  # 5 prompts, batches of 2
    rows = read_jsonl(runs / "sft" / "version_0" / "predictions.jsonl")
    expected = expected_predictions(hf_export, prompts, [[0, 1], [2, 3], [4]])
    assert [r["prompt"][-1]["content"] for r in rows] == [
        "What is 2 + 3?",
        "Uppercase: cat",
        "Reverse: red fox",
        "Sort: 3 1 2",
        "Count: a b",
    ]
    assert [r.get("id") for r in rows] == ["a", 7, None, None, None]
    assert [r["reference"] for r in rows] == ["5", "", "fox red", "1 2 3", "2"]
    assert rows == expected
    assert list(rows[0]) == ["id", "prompt", "reference", "output"]

    # an output path from the command line: the appended writer replaces the default one
    out = tmp_path / "out" / "completions.jsonl"
    out.parent.mkdir()
    out.write_text("stale line\n", encoding="utf-8")
    cli_main(
        predict_args(
            hf_export,
            prompts,
            runs,
            "--trainer.callbacks+=src.callbacks.PredictionWriter",
            f"--trainer.callbacks.output={out}",
        )
    )
    assert read_jsonl(out) == expected  # replaced, not appended to
    assert not (runs / "sft" / "version_1" / "predictions.jsonl").exists()


@pytest.mark.slow
def test_two_process_predict_writes_each_prompt_once_in_order(tmp_path, hf_export):
    """2 CPU processes share the prompts (the last one repeated so both get 3); rank 0
    gathers and writes them in input order, the repeat dropped."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    out = tmp_path / "predictions.jsonl"
    args = predict_args(
        hf_export,
        prompts,
        tmp_path / "runs",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.callbacks",
        f"[{{class_path: src.callbacks.PredictionWriter, init_args: {{output: {out}}}}}]",
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        cwd=ROOT,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # rank 0 predicts prompts 0, 2, 4; rank 1 prompts 1, 3 and 4 again
    assert read_jsonl(out) == expected_predictions(hf_export, prompts, [[0, 2], [4], [1, 3]])
