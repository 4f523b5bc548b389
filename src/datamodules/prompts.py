"""Prompts for online RL (GRPO): each row a prompt and the fields its reward functions read.

A row is a ``prompt`` (a string or messages) with other columns (``answer``, ``tests``, ...),
or a conversation in any chat format whose final assistant turn is taken as the reference
answer (the ``answer`` field, unless the row has one). A source's ``columns`` mapping names
the fields: ``columns: {prompt: question, answer: solution}``. The prompt is stored as the
tokens generation starts from (the chat template's generation prompt, with the BOS the
training rows get); every other field travels with it, as text, to the reward functions.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch.utils.data import Dataset

from src.datamodules.base import BaseDataModule, Columns, Example
from src.datamodules.chat import Message, encode_texts, prompt_texts
from src.datamodules.records import DataError, Record
from src.datamodules.sft import prompt_and_reference
from src.datamodules.stats import SplitStats

PROMPT_FIELDS = ("prompt", "messages", "conversations", "instruction", "input", "output")
REFERENCE = "answer"  # the field a final assistant turn becomes


class PromptDataModule(BaseDataModule):
    """Prompts with answer fields, for objectives that generate their own completions.

    A prompt longer than ``max_prompt_length`` tokens is dropped (and counted): a cut prompt
    would ask another question. Batches hold the prompts left-padded (``prompt_ids``,
    ``prompt_mask``), the last user message of each (``prompts``) and each row's fields
    (``fields``: a list of dicts).

    Args:
        max_prompt_length: Longest prompt in tokens (default: half of ``max_length``; the
            completion gets the rest, see ``GRPOModule.max_new_tokens``).
        **kwargs: See ``BaseDataModule``.
    """

    score_unit = "prompts"

    def __init__(self, *args: Any, max_prompt_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_prompt_length = max_prompt_length or self.max_length // 2
        self.repeats = 1  # see repeat_rounds
        self.round_rows = 1

    def settings(self) -> dict[str, Any]:
        return {"max_prompt_length": self.max_prompt_length}

    def to_example(self, record: Record, fmt: str) -> Example:
        prompt, reference = prompt_and_reference(record, fmt)
        if not prompt:
            raise DataError(f"{record.where}: no prompt (a user turn) in the row")
        fields = {k: _text(v) for k, v in record.row.items() if k not in PROMPT_FIELDS}
        if reference and REFERENCE not in fields:
            fields[REFERENCE] = reference
        return {"prompt": prompt, "fields": fields}

    def encode_chunk(
        self, examples: list[Example], wheres: list[str]
    ) -> tuple[Columns, SplitStats]:
        stats = SplitStats()
        columns: Columns = {"input_ids": [], "prompt": [], "fields": []}
        texts = prompt_texts(self.tokenizer, [e["prompt"] for e in examples])
        for example, ids in zip(examples, encode_texts(self.tokenizer, texts), strict=True):
            stats.record_length(len(ids))
            if len(ids) > self.max_prompt_length:
                stats.drop(f"with a prompt longer than max_prompt_length {self.max_prompt_length}")
                continue
            stats.examples += 1
            stats.tokens += len(ids)
            columns["input_ids"].append(list(ids))
            columns["prompt"].append(_last_user_text(example["prompt"]))
            columns["fields"].append(json.dumps(example["fields"], ensure_ascii=False))
        return columns, stats

    def collator(self) -> PromptCollator:
        return PromptCollator(self.tokenizer.pad_token_id)

    def sample_prompts(self, n: int | None = None) -> list[tuple[list[Message], str]]:
        """The first ``n`` validation prompts and their ``answer`` fields (for
        ``SampleGeneration``'s table and metrics)."""
        return [(e["prompt"], e["fields"].get(REFERENCE, "")) for e in self.val_examples[:n]]

    # ------------------------------------------------- several updates per generation
    def repeat_rounds(self, repeats: int, round_rows: int) -> None:
        """Serve every round of ``round_rows`` training prompts (one optimizer step's, over
        every device) ``repeats`` times in a row, so that a generation batch is trained on
        ``repeats`` times (GRPO's ``num_iterations``); the rounds are reshuffled every epoch."""
        if repeats > 1 and self.num_workers:
            raise DataError(
                "repeated rounds (num_iterations > 1) need data.num_workers 0: the round order "
                "is reshuffled every epoch in this process"
            )
        self.repeats, self.round_rows = repeats, round_rows

    def train_dataloader(self) -> Any:
        if self.repeats == 1:
            return super().train_dataloader()
        data = self.datasets["train"]
        if not isinstance(data, RepeatedRounds):
            self.datasets["train"] = RepeatedRounds(data, self.round_rows, self.repeats, self.seed)
        return self._loader("train", self.batch_size, shuffle=False)  # the order is its own

    def set_epoch(self, epoch: int) -> None:
        data = self.datasets.get("train")
        if isinstance(data, RepeatedRounds):
            data.epoch = epoch


class RepeatedRounds(Dataset):
    """A dataset's rows in rounds of ``round_rows``, each round ``repeats`` times in a row.

    Row ``i`` is round ``i // (round_rows * repeats)``'s ``i % round_rows``-th row, in a
    seeded permutation of the rows drawn anew each ``epoch``; a last, incomplete round is
    left out. Read in order and split by rank as a distributed sampler does (rank ``r``
    takes rows ``r, r + W, ...``), every rank sees its share of a round ``repeats`` times.
    """

    def __init__(self, data: Any, round_rows: int, repeats: int, seed: int) -> None:
        if len(data) < round_rows:
            raise DataError(
                f"{len(data)} training prompts do not fill one optimizer step of {round_rows} "
                "(batch_size x accumulate_grad_batches x devices)"
            )
        self.data, self.round_rows, self.repeats, self.seed = data, round_rows, repeats, seed
        self.rounds = len(data) // round_rows
        self.epoch = 0
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return self.rounds * self.round_rows * self.repeats

    def __getitem__(self, i: int) -> Any:
        block = self.round_rows * self.repeats
        row = (i // block) * self.round_rows + i % block % self.round_rows
        return self.data[self._permutation()[row]]

    def _permutation(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.data), generator=generator).tolist())
        return self._order[1]


class PromptCollator:
    """Prompts left-padded for generation (``prompt_ids``, ``prompt_mask``), each row's last
    user message (``prompts``, what reward functions get as the prompt) and its fields
    (``fields``, dicts)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, width - n :] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            mask[i, width - n :] = 1
        fields = [json.loads(r["fields"]) for r in rows]
        prompts = [r["prompt"] for r in rows]
        return {"prompt_ids": ids, "prompt_mask": mask, "prompts": prompts, "fields": fields}


def _last_user_text(messages: list[Message]) -> str:
    users = [m.get("content") or "" for m in messages if m["role"] == "user"]
    return str(users[-1]) if users else ""


def _text(value: Any) -> Any:
    """A field as the reward functions get it: strings and numbers as they are, None kept,
    anything else (lists, dicts) as JSON text."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    return json.dumps(value, ensure_ascii=False)
