"""Unpaired preference data (KTO): a prompt, one completion, and whether it is desirable.

Each row also carries a mismatched sequence for KTO's KL term: its prompt with the completion
of another row. The partners are fixed when a split is prepared (``mismatched_partners``), so
the KL estimate of a batch depends on which rows it holds, never on the batch size or the
number of devices that share them.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from functools import cached_property
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from src.datamodules.base import BaseDataModule, Columns, Example
from src.datamodules.chat import (
    IGNORE_INDEX,
    ChatEncoder,
    Message,
    Response,
    encode_texts,
    encode_with_offsets,
    labels_for_spans,
    row_errors,
)
from src.datamodules.collate import UnpairedCollator
from src.datamodules.formats import to_unpaired
from src.datamodules.preference import fit_to_length, prompt_budget
from src.datamodules.records import DataError, Record
from src.datamodules.stats import SplitStats

# encode_chunk's columns; finalize turns prompt_length into each row's KL sequence
ENCODED = ("input_ids", "labels", "prompt_length", "label", "loss_weight")


class UnpairedPreferenceDataModule(BaseDataModule):
    """Prompts with one completion each, labelled desirable or undesirable (KTO).

    Rows are any chat format with a boolean ``label`` (TRL's unpaired preference rows:
    ``prompt`` and ``completion``, strings or messages) or ``kto_tag`` (LLaMA-Factory's
    ``messages`` / ShareGPT ``conversations``, whose final assistant turns are the
    completion); a source's ``columns`` mapping names other fields. The completion is
    encoded as a preference response is (``PreferenceDataModule``): its assistant turns in the
    rendering of prompt + completion, through their stop token, are the labels; a too-long
    row keeps the end of its prompt (and its BOS) and the start of its completion, counted.

    Every row gets ``kl_input_ids`` / ``kl_labels``: its prompt followed by the completion of
    a partner row (another prompt where the split has one), cut to ``max_length``. There is
    no packing: the mismatched sequences double every row and keep it short, and packing
    would pair prompts with completions across packed rows for no gain.

    Args:
        max_prompt_length: Prompt tokens kept when a row is too long (default: half of
            ``max_length``); a prompt keeps more when the completion leaves room.
        **kwargs: See ``BaseDataModule``.
    """

    score_unit = "rows"

    def __init__(self, *args: Any, max_prompt_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_prompt_length = prompt_budget(max_prompt_length, self.max_length)

    def settings(self) -> dict[str, Any]:
        return {"max_prompt_length": self.max_prompt_length}

    def to_example(self, record: Record, fmt: str) -> Example:
        return to_unpaired(record, fmt)

    @cached_property
    def encoder(self) -> ChatEncoder:
        return self.chat_encoder()

    def encode_chunk(
        self, examples: list[Example], wheres: list[str]
    ) -> tuple[Columns, SplitStats]:
        stats = SplitStats()
        columns: Columns = {name: [] for name in ENCODED}
        tokens = self._tokens(self._responses(examples, wheres, stats))
        for example, (prompt, ids, labels) in zip(examples, tokens, strict=True):
            if not ids:
                stats.drop("with an empty completion")
                continue
            stats.record_length(len(prompt) + len(ids))
            prompt, (ids, labels) = self._fit(prompt, ids, labels, stats)
            weight = example.get("loss_weight", 1.0)
            stats.examples += 1
            stats.loss_weighted += weight != 1.0
            stats.tokens += len(prompt) + len(ids)
            stats.trained_tokens += sum(label != IGNORE_INDEX for label in labels)
            labels = [IGNORE_INDEX] * len(prompt) + labels
            values = (prompt + ids, labels, len(prompt), bool(example["label"]), weight)
            for name, value in zip(ENCODED, values, strict=True):
                columns[name].append(value)
        return columns, stats

    def _responses(
        self, examples: list[Example], wheres: list[str], stats: SplitStats
    ) -> list[Response]:
        """Each completion in the rendering of prompt + completion, and the text before it."""
        responses = []
        for example, where in zip(examples, wheres, strict=True):
            with row_errors(where):
                response = self.encoder.split_response(
                    example["prompt"], example["completion"], example.get("tools")
                )
            responses.append(response)
            stats.note_template(response.rendered)
        return responses

    def _tokens(self, responses: list[Response]) -> list[tuple[list[int], list[int], list[int]]]:
        """Each row's prompt ids (with a BOS where the template writes none), its completion's
        ids and their labels."""
        prompts = encode_texts(self.tokenizer, [r.prompt for r in responses])
        completions = encode_with_offsets(self.tokenizer, [r.text for r in responses])
        out = []
        for response, prompt, (ids, offsets) in zip(responses, prompts, completions, strict=True):
            prompt = list(prompt)
            if self.encoder.needs_bos(response.prompt):
                prompt.insert(0, self.encoder.bos_id)
            out.append((prompt, list(ids), labels_for_spans(ids, offsets, response.spans)))
        return out

    def _fit(
        self, prompt: list[int], ids: list[int], labels: list[int], stats: SplitStats
    ) -> tuple[list[int], tuple[list[int], list[int]]]:
        """A too-long row keeps the end of its prompt and the start of its completion."""
        bos_id = self.tokenizer.bos_token_id  # written by the template or added by us
        limits = (self.max_length, self.max_prompt_length)
        prompt, fitted = fit_to_length(prompt, {"": (ids, labels)}, *limits, bos_id, stats)
        return prompt, fitted[""]

    def finalize(self, columns: Columns, stats: SplitStats) -> Columns:
        """Each row's KL sequence: its prompt with its partner's completion."""
        starts = columns.pop("prompt_length")
        ids, labels = columns["input_ids"], columns["labels"]
        if len(ids) == 1:
            raise DataError(
                "a split of one unpaired row cannot pair its prompt with another row's "
                "completion for KTO's KL term: give each split at least 2 rows (val_split as a "
                "count of 2 or more, or more rows in val_files)"
            )
        prompts = [tuple(row[:start]) for row, start in zip(ids, starts, strict=True)]
        partners = mismatched_partners(prompts, self.seed)
        shared = sum(prompts[j] == prompt for prompt, j in zip(prompts, partners, strict=True))
        if shared:
            rank_zero_warn(
                f"[data] {shared} of {len(ids)} rows have a KL partner with the same prompt "
                "(one prompt holds more than half of the split's rows)"
            )
        columns["kl_input_ids"], columns["kl_labels"] = [], []
        for i, j in enumerate(partners):
            room = self.max_length - starts[i]
            columns["kl_input_ids"].append(ids[i][: starts[i]] + ids[j][starts[j] :][:room])
            columns["kl_labels"].append(labels[i][: starts[i]] + labels[j][starts[j] :][:room])
        return columns

    def collator(self) -> UnpairedCollator:
        return UnpairedCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def sample_prompts(self, n: int | None = None) -> list[tuple[list[Message], str]]:
        """The first ``n`` validation prompts of desirable rows, their completions as references."""
        desirable = [e for e in self.val_examples if e["label"]]
        return [(e["prompt"], e["completion"][0].get("content") or "") for e in desirable[:n]]


def mismatched_partners(keys: list[Hashable], seed: int) -> list[int]:
    """A partner row for every row, never itself, and with another key (prompt) wherever the
    rows allow it; fixed by ``seed``.

    The rows are ordered by key, the keys in a seeded random order (and the rows of a key
    too), and each row's partner is the row ``m`` places further round, ``m`` being the
    largest number of rows of one key: a key's rows are consecutive and at most ``m``, so
    none meets its own unless one key holds more than half of the rows.
    """
    n = len(keys)
    if n < 2:
        return list(range(n))
    rng = random.Random(seed)
    rank = {key: rng.random() for key in dict.fromkeys(keys)}
    ties = [rng.random() for _ in range(n)]
    order = sorted(range(n), key=lambda i: (rank[keys[i]], ties[i]))
    counts: dict[Hashable, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    shift = max(counts.values())
    shift = shift if shift < n else 1  # one prompt only: any other row will do
    partners = [0] * n
    for k, i in enumerate(order):
        partners[i] = order[(k + shift) % n]
    return partners
