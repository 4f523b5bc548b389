"""Pretraining data: documents tokenized with EOS, concatenated and cut into blocks."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from src.datamodules.base import BaseDataModule, Columns, Example
from src.datamodules.chat import ChatEncoder
from src.datamodules.collate import Collator
from src.datamodules.formats import to_text
from src.datamodules.packing import cut_blocks
from src.datamodules.records import DataError, Record
from src.datamodules.stats import SplitStats


class PretrainDataModule(BaseDataModule):
    """Plain text (``text`` rows, .txt files) for causal language modelling.

    Every document gets EOS (and BOS when the tokenizer uses one); the token stream is cut
    into blocks of ``max_length``; the last, shorter block is kept and padded.

    Args:
        format: ``text`` (or ``auto``).
        isolate_documents: Restart ``position_ids`` at every document in a block and never
            predict a document's first token from the previous one (no cross-document
            attention), instead of plain concatenation.
        padding_free: With ``isolate_documents``, concatenate a batch's rows into one row.
        **kwargs: See ``BaseDataModule``.
    """

    def __init__(
        self,
        *args: Any,
        format: str = "text",
        isolate_documents: bool = False,
        padding_free: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, format=format, **kwargs)
        self.isolate_documents = isolate_documents
        self.padding_free = padding_free

    def settings(self) -> dict[str, Any]:
        return {"isolate_documents": self.isolate_documents}

    @cached_property
    def encoder(self) -> ChatEncoder:
        return self.chat_encoder()

    def to_example(self, record: Record, fmt: str) -> Example:
        return {"text": to_text(record, fmt)}

    def encode_chunk(
        self, examples: list[Example], wheres: list[str]
    ) -> tuple[Columns, SplitStats]:
        for example, where in zip(examples, wheres, strict=True):
            if "loss_weight" in example:
                raise DataError(
                    f"{where}: loss weights apply to SFT and preference data; to change a "
                    "source's share of pretraining, give it a sampling weight with mix: "
                    "interleave"
                )
        stats = SplitStats()
        documents = []
        for ids in self.encoder.encode_documents([e["text"] for e in examples]):
            reason = self.filters.token_verdict(len(ids))
            if reason:
                stats.drop(reason)
                continue
            stats.examples += 1
            stats.tokens += len(ids)
            documents.append(ids)
        return {"documents": documents}, stats

    def finalize(self, columns: Columns, stats: SplitStats) -> Columns:
        blocks = cut_blocks(columns.get("documents", []), self.max_length, self.isolate_documents)
        stats.packed_rows, stats.row_length = len(blocks["input_ids"]), self.max_length
        # every token but the first of each row (and of each document, when isolated)
        firsts = (
            sum(map(len, blocks["seq_lengths"])) if "seq_lengths" in blocks else stats.packed_rows
        )
        stats.trained_tokens = stats.tokens - firsts
        return blocks

    def collator(self) -> Collator:
        return Collator(self.tokenizer.pad_token_id, self.pad_to_multiple_of, self.padding_free)
