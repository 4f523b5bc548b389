"""Supervised fine-tuning data: conversations rendered by the chat template, assistant labels."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from torch.utils.data import DataLoader

from src.datamodules.base import BaseDataModule, Columns, Example, as_list
from src.datamodules.chat import IGNORE_INDEX, ChatEncoder, Message, TrainOn, prompt_messages
from src.datamodules.collate import Collator
from src.datamodules.formats import to_chat, to_sft_example
from src.datamodules.packing import pack_rows
from src.datamodules.records import DataError, Record
from src.datamodules.sources import Source, as_sources
from src.datamodules.stats import SplitStats

NO_TRAINED_TOKEN = "with no trained token (no assistant turn within max_length)"
CHAT_FIELDS = ("messages", "conversations", "instruction")  # rows that are more than a prompt


class SFTDataModule(BaseDataModule):
    """Chat data (messages, ShareGPT, alpaca, prompt/completion) or text, for SFT.

    Args:
        train_on: Tokens that carry a loss: ``assistant`` (every assistant turn, with its
            end-of-turn token), ``last_assistant``, or ``all``.
        packing: Pack examples into rows of ``max_length`` by best-fit-decreasing, with
            ``position_ids`` restarting per example and no attention mask.
        split_long: When packing, split examples longer than ``max_length`` into pieces
            instead of truncating them.
        padding_free: When packing, concatenate a batch's rows into a single row.
        predict_files: Prompts for ``predict``: rows of any chat format (detected from their
            fields) or a ``prompt`` alone; a final assistant turn, if any, is dropped and kept
            as the reference; a row's ``id`` is copied to its prediction. Default: the
            validation data.
        **kwargs: See ``BaseDataModule``.
    """

    def __init__(
        self,
        *args: Any,
        train_on: TrainOn = "assistant",
        packing: bool = False,
        split_long: bool = False,
        padding_free: bool = False,
        predict_files: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.train_on = train_on
        self.packing = packing
        self.split_long = split_long
        self.padding_free = padding_free
        self.predict_files = as_list(predict_files)
        self.predict_ids: list[Any] = []  # the ids of the predicted rows, filled by the loader

    def settings(self) -> dict[str, Any]:
        return {"train_on": self.train_on, "packing": self.packing, "split_long": self.split_long}

    @cached_property
    def encoder(self) -> ChatEncoder:
        return self.chat_encoder(self.train_on)

    def to_example(self, record: Record, fmt: str) -> Example:
        return to_sft_example(record, fmt)

    def encode_chunk(
        self, examples: list[Example], wheres: list[str]
    ) -> tuple[Columns, SplitStats]:
        stats = SplitStats()
        columns: Columns = {"input_ids": [], "labels": [], "loss_weight": []}
        encoded = self.encoder.encode(examples, wheres)
        for example, tok in zip(examples, encoded, strict=True):
            stats.note_template(tok)
            stats.record_length(len(tok.input_ids))
            reason = self.filters.token_verdict(len(tok.input_ids))
            if reason:
                stats.drop(reason)
                continue
            pieces = [(tok.input_ids, tok.labels)]
            if len(tok.input_ids) > self.max_length:
                step = self.max_length
                if self.packing and self.split_long:
                    stats.count("long examples split into pieces")
                    pieces = [
                        (tok.input_ids[i : i + step], tok.labels[i : i + step])
                        for i in range(0, len(tok.input_ids), step)
                    ]
                else:
                    stats.truncated += 1
                    pieces = [(tok.input_ids[:step], tok.labels[:step])]
            kept = False
            for ids, labels in pieces:
                trained = sum(label != IGNORE_INDEX for label in labels[1:])
                if trained == 0:
                    continue
                kept = True
                stats.tokens += len(ids)
                stats.trained_tokens += trained
                columns["input_ids"].append(ids)
                columns["labels"].append(labels)
                columns["loss_weight"].append(example.get("loss_weight", 1.0))
            if kept:
                stats.examples += 1
                stats.loss_weighted += example.get("loss_weight", 1.0) != 1.0
            else:
                stats.drop(NO_TRAINED_TOKEN)
        return columns, stats

    def finalize(self, columns: Columns, stats: SplitStats) -> Columns:
        if not self.packing:
            return columns
        packed = pack_rows(
            columns["input_ids"], columns["labels"], self.max_length, columns.get("loss_weight")
        )
        stats.packed_rows, stats.row_length = len(packed["input_ids"]), self.max_length
        return packed

    def collator(self) -> Collator:
        return Collator(self.tokenizer.pad_token_id, self.pad_to_multiple_of, self.padding_free)

    # ------------------------------------------------------------ generation
    def sample_prompts(self, n: int | None = None) -> list[tuple[list[Message], str]]:
        """The first ``n`` validation conversations as (prompt messages, reference answer)."""
        chats = [e for e in self.val_examples if "messages" in e]
        return [_prompt_and_reference(e["messages"]) for e in chats[:n]]

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict" or not self.predict_files:
            super().setup(stage)

    def predict_dataloader(self) -> DataLoader:
        """Batches of (prompt messages, reference) pairs, in input order, generated from by
        the model. ``predict_ids`` keeps each prompt's ``id`` (``None`` without one)."""
        if self.predict_files:
            rows = read_prompts(self.predict_files)
            samples = [(p, r) for p, r, _ in rows]
            self.predict_ids = [i for _, _, i in rows]
        else:
            samples = self.sample_prompts()
            self.predict_ids = [None] * len(samples)
        return self.prompt_loader(samples)


PromptRow = tuple[list[Message], str, Any]  # prompt messages, reference, the row's id


def read_prompts(files: str | list[str] | list[Source], fmt: str = "auto") -> list[PromptRow]:
    """Every row of ``files`` as (prompt messages, reference answer, the row's ``id``).

    Rows come in any chat format (by their fields, or a ``Source``'s ``format``), or as a
    ``prompt`` alone (a string or messages); a final assistant turn is the reference.
    """
    sources = as_sources(files)
    rows = []
    for i, source in enumerate(sources):
        for record in source.records(i):
            prompt, reference = prompt_and_reference(record, source.format or fmt)
            rows.append((prompt, reference, record.row.get("id")))
    if not rows:
        raise DataError(f"no prompts in {', '.join(s.path for s in sources) or 'no file'}")
    return rows


def prompt_and_reference(record: Record, fmt: str = "auto") -> tuple[list[Message], str]:
    """A row's prompt messages and its reference answer (a final assistant turn, else "");
    a row may hold a ``prompt`` alone (a string or messages)."""
    record, name = _prompt_alone(record, fmt)
    return _prompt_and_reference(to_chat(record, name)["messages"])


def _prompt_alone(record: Record, fmt: str) -> tuple[Record, str]:
    """A row holding only a ``prompt`` (no completion) as a ``messages`` row."""
    row = record.row
    if fmt not in ("auto", "prompt_completion") or row.get("prompt") is None:
        return record, fmt
    if fmt == "auto" and any(row.get(f) is not None for f in CHAT_FIELDS):
        return record, fmt
    if row.get("completion") is not None:
        return record, fmt
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return Record({**row, "messages": messages}, record.where, record.source), "messages"


def _prompt_and_reference(messages: list[Message]) -> tuple[list[Message], str]:
    prompt = prompt_messages(messages)
    reference = messages[len(prompt)]["content"] if len(prompt) < len(messages) else ""
    return prompt, reference
