"""Supervised fine-tuning data: conversations rendered by the chat template, assistant labels."""

from __future__ import annotations

from typing import Any

import datasets
from torch.utils.data import DataLoader

from src.datamodules.base import BaseDataModule, SplitStats, as_list
from src.datamodules.chat import IGNORE_INDEX, Message, prompt_messages, tokenize_conversation
from src.datamodules.formats import ChatFormat, to_messages
from src.datamodules.records import DataError, Record


class SFTDataModule(BaseDataModule):
    """Chat data in ``messages`` or alpaca format, trained on the assistant turns.

    Args:
        format: ``auto`` (from the fields of each row), ``messages`` or ``alpaca``.
        predict_files: Prompts for ``predict`` (rows of the same formats; a final assistant
            turn, if any, is dropped and kept as the reference). Default: the validation data.
        **kwargs: See ``BaseDataModule``.
    """

    def __init__(
        self,
        *args: Any,
        format: ChatFormat = "auto",
        predict_files: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.format = format
        self.predict_files = as_list(predict_files)

    def build(self, records: list[Record], stats: SplitStats) -> datasets.Dataset:
        if records and not self.tokenizer.chat_template:
            raise DataError(
                f"the tokenizer {self.tokenizer_name_or_path!r} has no chat template; "
                "use one that has (a chat or instruct model's tokenizer)"
            )
        rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for record in records:
            messages = to_messages(record, self.format)
            try:
                tok = tokenize_conversation(self.tokenizer, messages)
            except ValueError as err:  # the template hides an assistant turn
                raise DataError(f"{record.where}: {err}") from None
            if len(tok.input_ids) > self.max_length:
                stats.truncated += 1
                tok.input_ids = tok.input_ids[: self.max_length]
                tok.labels = tok.labels[: self.max_length]
            trained = sum(label != IGNORE_INDEX for label in tok.labels)
            if trained == 0:
                stats.drop("with no trained token (no assistant turn within max_length)")
                continue
            stats.examples += 1
            stats.tokens += len(tok.input_ids)
            stats.trained_tokens += trained
            rows["input_ids"].append(tok.input_ids)
            rows["labels"].append(tok.labels)
        return datasets.Dataset.from_dict(rows)

    def sample_prompts(self, n: int | None = None) -> list[tuple[list[Message], str]]:
        """The first ``n`` validation conversations as (prompt messages, reference answer)."""
        return [self._prompt_and_reference(r) for r in self.val_records[:n]]

    def _prompt_and_reference(self, record: Record) -> tuple[list[Message], str]:
        messages = to_messages(record, self.format)
        prompt = prompt_messages(messages)
        reference = messages[len(prompt)]["content"] if len(prompt) < len(messages) else ""
        return prompt, reference

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict" or not self.predict_files:
            super().setup(stage)

    def predict_dataloader(self) -> DataLoader:
        """Batches of (prompt messages, reference) pairs, generated from by the model."""
        if self.predict_files:
            samples = [self._prompt_and_reference(r) for r in self._read(self.predict_files)]
        else:
            samples = self.sample_prompts()
        return DataLoader(samples, batch_size=self.val_batch_size, collate_fn=list, shuffle=False)
