"""Sample generation at every validation: a TensorBoard text table and generation metrics."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.functional.text import bleu_score, rouge_score

from src.callbacks.run_dir import run_dir
from src.datamodules.sft import read_prompts
from src.generation import Message
from src.loggers import log_table
from src.strategies import call_outside_step, parameters_are_sharded

Prompt = str | list[Message]
Sample = tuple[list[Message], str]  # prompt messages, reference answer ("" if none)
MetricName = Literal["exact_match", "bleu", "rouge_l"]
METRICS: tuple[str, ...] = ("exact_match", "bleu", "rouge_l")


def generation_metrics(
    outputs: list[str], references: list[str], names: list[str] | tuple[str, ...] = METRICS
) -> dict[str, float]:
    """Scores in [0, 1] of ``outputs`` against ``references`` (both compared stripped).

    ``exact_match``: share of outputs equal to their reference. ``bleu``: corpus BLEU-4 of
    torchmetrics (whitespace tokens, no smoothing: 0 until some 4-gram matches). ``rouge_l``:
    mean ROUGE-L F1 of the pairs, over lower-cased word tokens (punctuation dropped, as in
    Google's ``rouge_score``, but letters of every script kept).
    """
    outputs = [o.strip() for o in outputs]
    references = [r.strip() for r in references]
    if not outputs:
        return {}
    scores: dict[str, float] = {}
    for name in names:
        if name == "exact_match":
            hits = sum(o == r for o, r in zip(outputs, references, strict=True))
            scores[name] = hits / len(outputs)
        elif name == "bleu":
            scores[name] = float(bleu_score(outputs, [[r] for r in references], n_gram=4))
        elif name == "rouge_l":
            rouge = rouge_score(outputs, references, rouge_keys="rougeL", normalizer=_words)
            scores[name] = float(rouge["rougeL_fmeasure"])
        else:
            raise ValueError(f"unknown generation metric {name!r} (expected {', '.join(METRICS)})")
    return scores


def _words(text: str) -> str:
    """ROUGE's normalisation (lower case, non-word characters to spaces), for every script."""
    return re.sub(r"[\W_]+", " ", text.lower())


class SampleGeneration(pl.Callback):
    """Generate answers after each validation: a table of samples, and optional metrics.

    The table (prompt | reference | output) goes to TensorBoard (*Text*, tag ``samples``)
    and to ``<run>/samples.jsonl``. Metrics compare the outputs for the first
    ``num_metric_samples`` validation conversations to their reference answers and are
    logged as ``val/gen/<metric>``.

    Args:
        prompts: User messages (strings) or whole message lists, shown without reference.
        prompts_file: Or (without ``prompts``) a file or files of rows in any chat format
            (messages, ShareGPT, alpaca, prompt/completion, or a ``prompt`` alone); a final
            assistant turn is the reference. Without ``prompts`` and ``prompts_file``: the
            first ``num_samples`` validation conversations, with their reference answers.
        num_samples: How many validation prompts to show when no prompts are given.
        max_new_tokens: Length limit of each answer.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (with ``do_sample``).
        top_p: Nucleus sampling: keep the most likely tokens up to this probability mass
            (with ``do_sample``; ``null``: all of them).
        seed: Seed of sampling, so samples of different steps are comparable.
        metrics: Generation metrics to log on validation prompts: ``exact_match``, ``bleu``
            (corpus BLEU-4), ``rouge_l`` (ROUGE-L F1); outputs and references are stripped.
        num_metric_samples: How many validation conversations (with a reference) to score.
        batch_size: Prompts generated for at once.
    """

    def __init__(
        self,
        prompts: list[Prompt] | None = None,
        prompts_file: str | list[str] | None = None,
        num_samples: int = 4,
        max_new_tokens: int = 48,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float | None = None,
        seed: int = 0,
        metrics: list[MetricName] | None = None,
        num_metric_samples: int = 64,
        batch_size: int = 16,
    ) -> None:
        unknown = [m for m in metrics or [] if m not in METRICS]
        if unknown:
            raise ValueError(
                f"SampleGeneration: unknown metrics {unknown} (expected {', '.join(METRICS)})"
            )
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"SampleGeneration: top_p must be in (0, 1], got {top_p}")
        if batch_size < 1 or num_samples < 0 or num_metric_samples < 0:
            raise ValueError("SampleGeneration: batch_size must be >= 1, sample counts >= 0")
        self.prompts = prompts or []
        self.prompts_file = prompts_file
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.metrics = list(dict.fromkeys(metrics or []))
        self.num_metric_samples = num_metric_samples
        self.batch_size = batch_size
        self._file_samples: list[Sample] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.prompts_file and self._file_samples is None:  # read now: a bad file fails early
            self._file_samples = [(p, r) for p, r, _ in read_prompts(self.prompts_file)]
        complete = getattr(pl_module, "complete", None)
        if self.top_p is not None and callable(complete) and not _takes(complete, "top_p"):
            raise ValueError(
                f"SampleGeneration: top_p needs {type(pl_module).__name__}.complete() to take "
                "a top_p argument"
            )

    def fixed_samples(self) -> list[Sample]:
        """The configured prompts (no reference) or the prompts file's rows."""
        if self.prompts:
            return [
                ([{"role": "user", "content": p}] if isinstance(p, str) else list(p), "")
                for p in self.prompts
            ]
        return list(self._file_samples or [])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # sharded weights: every rank takes part in decoding (the same prompts), rank 0 writes
        everyone = parameters_are_sharded(trainer.strategy)
        fixed = self.fixed_samples()
        shown = 0 if fixed else self.num_samples
        scored = self.num_metric_samples if self.metrics else 0
        val = _validation_samples(trainer, max(shown, scored)) if max(shown, scored) else []
        samples = fixed + val
        outputs = (
            self._complete(pl_module, [p for p, _ in samples])
            if samples and (everyone or trainer.is_global_zero)
            else []
        )
        if self.metrics:
            self._log_metrics(trainer, pl_module, val[:scored], outputs[len(fixed) :][:scored])
        table = samples[: len(fixed) + shown]
        if not trainer.is_global_zero or not table:
            return
        rows = [
            {"step": trainer.global_step, "prompt": p[-1]["content"], "reference": r, "output": o}
            for (p, r), o in zip(table, outputs[: len(table)], strict=True)
        ]
        self._write(trainer, rows)

    def _complete(self, pl_module: pl.LightningModule, prompts: list[list[Message]]) -> list[str]:
        """Answers in batches, sampled with a fixed seed without disturbing the training RNG
        streams (CPU and GPU)."""
        args: tuple[Any, ...] = (self.max_new_tokens, self.do_sample, self.temperature)
        if self.top_p is not None:
            args += (self.top_p,)
        device = pl_module.device
        outputs: list[str] = []
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                outputs += call_outside_step(pl_module, "complete", chunk, *args)
        return outputs

    def _log_metrics(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        samples: list[Sample],
        outputs: list[str],
    ) -> None:
        """Rank 0 scores; every rank logs its values (unsynced), so they can be monitored."""
        scores = None
        if trainer.is_global_zero:
            pairs = [(o, r) for (_, r), o in zip(samples, outputs, strict=True) if r.strip()]
            scores = generation_metrics([o for o, _ in pairs], [r for _, r in pairs], self.metrics)
            if not pairs:
                rank_zero_warn("SampleGeneration: no validation conversation with a reference")
        if trainer.world_size > 1:
            scores = trainer.strategy.broadcast(scores, src=0)
        for name, value in (scores or {}).items():
            pl_module.log(f"val/gen/{name}", value, sync_dist=False, on_step=False, on_epoch=True)

    def _write(self, trainer: pl.Trainer, rows: list[dict[str, Any]]) -> None:
        shown = [{k: r[k] for k in ("prompt", "reference", "output")} for r in rows]
        log_table(trainer, "samples", shown, trainer.global_step)
        if run_dir(trainer):
            with open(Path(run_dir(trainer)) / "samples.jsonl", "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _takes(function: Any, name: str) -> bool:
    return name in inspect.signature(function).parameters


def _validation_samples(trainer: pl.Trainer, n: int) -> list[Sample]:
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "sample_prompts"):
        return []
    return list(datamodule.sample_prompts(n))
