"""Sample generation at every validation, logged to TensorBoard as a text table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from src.callbacks.run_dir import run_dir
from src.datamodules.chat import missing_bos
from src.strategies import call_outside_step, parameters_are_sharded

Message = dict[str, Any]
Prompt = str | list[Message]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[Message]],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    synced_gpus: bool = False,
) -> list[str]:
    """Completions of chat prompts (rendered with the generation prompt), batched, left-padded.

    ``synced_gpus`` keeps every rank stepping until all are done, for sharded models whose
    forward passes are collectives.
    """
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    # the same BOS rule as the training rows (see ChatEncoder.encode)
    texts = [t if missing_bos(tokenizer, t) is None else tokenizer.bos_token + t for t in texts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    enc = enc.to(model.device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            synced_gpus=synced_gpus,
        )
    finally:
        model.train(was_training)
    new_tokens = out[:, enc["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class SampleGeneration(pl.Callback):
    """Generate answers to fixed prompts after each validation and log them.

    Args:
        prompts: User messages (strings) or whole message lists; without them, the first
            ``num_samples`` validation conversations (with their reference answers).
        num_samples: How many validation prompts to use when ``prompts`` is empty.
        max_new_tokens: Length limit of each answer.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (with ``do_sample``).
        seed: Seed of sampling, so samples of different steps are comparable.
    """

    def __init__(
        self,
        prompts: list[Prompt] | None = None,
        num_samples: int = 4,
        max_new_tokens: int = 48,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.prompts = prompts or []
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.seed = seed

    def _samples(self, trainer: pl.Trainer) -> list[tuple[list[Message], str]]:
        if self.prompts:
            return [
                ([{"role": "user", "content": p}] if isinstance(p, str) else list(p), "")
                for p in self.prompts
            ]
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "sample_prompts"):
            return []
        return datamodule.sample_prompts(self.num_samples)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # sharded weights: every rank takes part in decoding, rank 0 writes
        everyone = parameters_are_sharded(trainer.strategy)
        if trainer.sanity_checking or not (everyone or trainer.is_global_zero):
            return
        samples = self._samples(trainer)
        if not samples:
            return
        # sample with a fixed seed without disturbing the training RNG streams (CPU and GPU)
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            outputs = call_outside_step(
                pl_module,
                "complete",
                [p for p, _ in samples],
                self.max_new_tokens,
                self.do_sample,
                self.temperature,
            )
        if not trainer.is_global_zero:
            return
        rows = [
            {"step": trainer.global_step, "prompt": p[-1]["content"], "reference": r, "output": o}
            for (p, r), o in zip(samples, outputs, strict=True)
        ]
        self._write(trainer, rows)

    def _write(self, trainer: pl.Trainer, rows: list[dict[str, Any]]) -> None:
        table = "| prompt | reference | output |\n|---|---|---|\n" + "\n".join(
            f"| {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r['output'])} |"
            for r in rows
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", table, global_step=trainer.global_step)
        if run_dir(trainer):
            with open(Path(run_dir(trainer)) / "samples.jsonl", "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")
