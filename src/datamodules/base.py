"""What every data module shares: tokenizer, sources, validation split, loaders, reporting."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import datasets
import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from src.datamodules.collate import PaddingCollator
from src.datamodules.records import DataError, Record, read_records


@dataclass
class SplitStats:
    """What preparation did to one split; reported before training starts."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self, split: str) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return (
            f"{split}: {self.rows} rows -> {self.examples} examples, {self.tokens} tokens "
            f"({self.trained_tokens} trained); truncated {self.truncated}; dropped: {drops}"
        )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (the EOS token stands in when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class BaseDataModule(pl.LightningDataModule):
    """Shared data plumbing; subclasses turn records into token rows in ``build``.

    Args:
        tokenizer: Hub id or local directory of the tokenizer (and its chat template).
        train_files: Local .json/.jsonl/.parquet files, or hub dataset ids, for training.
        val_files: Files for validation; without them ``val_split`` of the training rows.
        val_split: Fraction of the training rows held out for validation (seeded).
        max_length: Longest row in tokens; longer examples are truncated and counted.
        batch_size: Rows per training micro-batch.
        val_batch_size: Rows per validation batch (default: ``batch_size``).
        num_workers: Data-loader worker processes.
        seed: Seed of the validation split.
        hub_config: Configuration name for hub datasets.
        hub_split: Split to read from hub datasets.
        pad_to_multiple_of: Round padded lengths up to a multiple of this.
        trust_remote_code: Allow code shipped with a hub tokenizer to run.
    """

    def __init__(
        self,
        tokenizer: str,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        val_split: float = 0.05,
        max_length: int = 1024,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        hub_config: str | None = None,
        hub_split: str = "train",
        pad_to_multiple_of: int = 1,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {val_split}")
        self.tokenizer_name_or_path = tokenizer
        self.train_files = as_list(train_files)
        self.val_files = as_list(val_files)
        self.val_split = val_split
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.hub_config = hub_config
        self.hub_split = hub_split
        self.pad_to_multiple_of = pad_to_multiple_of
        self.trust_remote_code = trust_remote_code
        self.datasets: dict[str, datasets.Dataset] = {}
        self.stats: dict[str, SplitStats] = {}
        self.val_records: list[Record] = []

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_name_or_path, self.trust_remote_code)

    def build(self, records: list[Record], stats: SplitStats) -> datasets.Dataset:
        """Turn records into a dataset of token rows, counting what was truncated or dropped."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train, val = self._split_records()
        self.val_records = val
        for split, records in (("train", train), ("val", val)):
            stats = SplitStats(rows=len(records))
            self.datasets[split] = self.build(records, stats)
            self.stats[split] = stats
            rank_zero_info(f"[data] {stats.summary(split)}")
            if split == "train" and stats.examples == 0:
                raise DataError(
                    f"no training examples left after preparation ({stats.summary(split)})"
                )

    def _read(self, sources: list[str]) -> list[Record]:
        records: list[Record] = []
        for source in sources:
            records += read_records(source, hub_config=self.hub_config, split=self.hub_split)
        return records

    def _split_records(self) -> tuple[list[Record], list[Record]]:
        if not self.train_files:
            raise DataError("no training data: set data.train_files")
        train = self._read(self.train_files)
        if not train:
            raise DataError(f"the training files hold no rows: {', '.join(self.train_files)}")
        if self.val_files:
            return train, self._read(self.val_files)
        n_val = round(len(train) * self.val_split)
        if n_val == 0:
            return train, []
        order = list(range(len(train)))
        random.Random(self.seed).shuffle(order)
        held_out = set(order[:n_val])
        return (
            [r for i, r in enumerate(train) if i not in held_out],
            [r for i, r in enumerate(train) if i in held_out],
        )

    def collator(self) -> Any:
        return PaddingCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> StatefulDataLoader:
        return StatefulDataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader | list:
        if len(self.datasets.get("val", [])) == 0:
            return []
        return self._loader("val", self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader | list:
        """``test`` evaluates on the validation data (the held-out split or ``val_files``)."""
        return self.val_dataloader()
