"""What every data module shares: sources, filters, the validation split, caching, loaders.

Preparation runs in this order, for any objective:

1. read the rows of every source (mixed by weight or concatenated) and convert them to a
   canonical example (``to_example``), naming the row of any bad input;
2. scrub PII and drop exact duplicates (``filters``), counted;
3. hold out the validation split (or read ``val_files``);
4. tokenize in chunks, across ``num_proc`` processes (``encode_chunk``), counting what is
   truncated or dropped;
5. pack (``finalize``), and store the result in the on-disk cache.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from src.compat import prefetched_batches
from src.datamodules import cache
from src.datamodules.cache import Score, add_scored_columns
from src.datamodules.chat import ChatEncoder, TrainOn
from src.datamodules.collate import Collator
from src.datamodules.filters import Filters, example_hash, scrub
from src.datamodules.reasoning import Reasoning
from src.datamodules.records import DataError, Record
from src.datamodules.registry import read_registry
from src.datamodules.sources import (
    MixMode,
    Source,
    Stopping,
    as_sources,
    fingerprint,
    loss_weight_of,
    mix,
)
from src.datamodules.splits import length_buckets, split_indices
from src.datamodules.stats import SplitStats
from src.datamodules.streaming import StreamingDataset
from src.datamodules.tokenizer import TokenizerKey, load_tokenizer

Example = dict[str, Any]
Columns = dict[str, list]
CHUNK = 1000  # examples per tokenizer batch and per worker task


def as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# per-example columns stored only where some example differs from the value that changes nothing
NEUTRAL_COLUMNS = {"loss_weight": 1.0, "margin": 0.0}


class BaseDataModule(pl.LightningDataModule):
    """Shared data plumbing; subclasses convert rows, encode examples and pack rows.

    Args:
        tokenizer: Hub id or local directory of the tokenizer.
        train_files: Training data: a path (file, directory or glob), a hub dataset id, or a
            list of them or of sources with ``path``, ``weight``, ``format``, ``columns``...
        val_files: Validation data, in the same forms; without it ``val_split`` of the
            training examples is held out.
        datasets: A dataset registry file naming datasets and the train (and val) mix (see
            ``registry.py``); when given, it replaces ``train_files`` and ``val_files``.
        val_split: Held-out share: a fraction below 1, or a number of examples from 1 up.
        stratify_by: Hold out the same share of every group: a column name, or ``length``
            (ten length quantiles).
        format: Row format: ``auto`` (from the fields) or a name (see ``formats.py``).
        columns: Our field name -> your column name, for every source that has no mapping
            of its own, e.g. ``{messages: dialog}``.
        chat_template: ``None`` for the tokenizer's own, a built-in name (chatml, llama-3,
            mistral, alpaca, plain), or a Jinja file.
        stop_token: A token generation stops on, besides the EOS and those of the
            tokenizer's ``generation_config.json``; it is put (and trained) after a last
            turn that the template closes with nothing. Default: the EOS.
        reasoning: What is trained of assistant reasoning (``reasoning_content`` or
            ``<think>`` blocks): ``template`` (what the chat template renders), ``strip``,
            ``keep_last`` or ``keep_all``.
        mix: ``concat`` the sources, or ``interleave`` them with probability ~ weight.
        stopping: When interleaving, stop at the ``first_exhausted`` source, or go on until
            ``all_exhausted`` (restarting the ones that ran out).
        filters: Length filters, de-duplication, PII scrubbing (see ``Filters``).
        max_length: Longest row in tokens.
        batch_size: Rows per training micro-batch.
        val_batch_size: Rows per validation batch (default: ``batch_size``).
        num_workers: Data-loader worker processes.
        num_proc: Processes that tokenize during preparation.
        seed: Seed of the validation split and of interleaving.
        streaming: Read the training data lazily (corpora larger than memory); needs
            ``trainer.max_steps`` and a ``val_split`` count or ``val_files``.
        cache_dir: Where prepared datasets are cached (``null``: no cache).
        hub_config: Configuration name for hub datasets given as plain ids.
        hub_split: Split to read from hub datasets given as plain ids.
        pad_to_multiple_of: Round padded lengths up to a multiple of this.
        trust_remote_code: Allow code shipped with a hub tokenizer to run.
    """

    score_unit = "examples"  # what a row of precomputed scores is, for messages

    def __init__(
        self,
        tokenizer: str,
        train_files: str | list[str | Source] | None = None,
        val_files: str | list[str | Source] | None = None,
        datasets: str | None = None,
        val_split: float = 0.05,
        stratify_by: str | None = None,
        format: str = "auto",
        columns: dict[str, str] | None = None,
        chat_template: str | None = None,
        stop_token: str | None = None,
        reasoning: Reasoning = "template",
        mix: MixMode = "concat",
        stopping: Stopping = "first_exhausted",
        filters: Filters | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        num_proc: int = 1,
        seed: int = 42,
        streaming: bool = False,
        cache_dir: str | None = ".cache/data",
        hub_config: str | None = None,
        hub_split: str = "train",
        pad_to_multiple_of: int = 1,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.tokenizer_name_or_path = tokenizer
        self.train_sources = self._sources(train_files, hub_config, hub_split, columns)
        self.val_sources = self._sources(val_files, hub_config, hub_split, columns)
        if datasets:
            self.train_sources, self.val_sources = read_registry(datasets)
            for source in (*self.train_sources, *self.val_sources):
                if columns and not source.columns:
                    source.columns = dict(columns)
            rank_zero_info(f"[data] the mix of {datasets} (in place of train_files, val_files)")
        self.val_split = val_split
        self.stratify_by = stratify_by
        self.format = format
        self.chat_template = chat_template
        self.stop_token = stop_token
        self.reasoning = reasoning
        self.mix = mix
        self.stopping = stopping
        self.filters = filters or Filters()
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.num_proc = max(1, num_proc)
        self.seed = seed
        self.streaming = streaming
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.pad_to_multiple_of = pad_to_multiple_of
        self.trust_remote_code = trust_remote_code
        self.datasets: dict[str, Any] = {}
        self.stats: dict[str, SplitStats] = {}
        self.val_examples: list[Example] = []
        if streaming and not self.val_sources and 0 < val_split < 1:
            raise DataError(
                "a streamed corpus has no known size: give val_split as a number of examples "
                "(held out from its start) or set val_files"
            )

    @staticmethod
    def _sources(
        value: Any, hub_config: str | None, hub_split: str, columns: dict[str, str] | None
    ) -> list[Source]:
        sources = as_sources(value)
        for source in sources:
            if columns and not source.columns:
                source.columns = dict(columns)
        items = value if isinstance(value, list) else ([value] if value else [])
        for source, item in zip(sources, items, strict=True):
            if isinstance(item, str):  # plain ids take the module-wide hub settings
                source.hub_config, source.split = hub_config, hub_split
        return sources

    @property
    def tokenizer_key(self) -> TokenizerKey:
        return TokenizerKey(self.tokenizer_name_or_path, self.trust_remote_code, self.chat_template)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """Loaded on first use, unless the CLI handed over the model's (one load per run)."""
        return load_tokenizer(*self.tokenizer_key)

    def chat_encoder(self, train_on: TrainOn = "assistant") -> ChatEncoder:
        """The encoder of this module's chat rows, with its stop token and reasoning policy."""
        stops = [self.stop_token] if self.stop_token else []
        return ChatEncoder(self.tokenizer, train_on, stops, self.reasoning)

    # ------------------------------------------------------- objective hooks
    def to_example(self, record: Record, fmt: str) -> Example:
        """The canonical example of a raw row (raises ``DataError`` naming the row)."""
        raise NotImplementedError

    def encode_chunk(
        self, examples: list[Example], wheres: list[str]
    ) -> tuple[Columns, SplitStats]:
        """Token columns of a chunk of examples, counting what was truncated or dropped."""
        raise NotImplementedError

    def finalize(self, columns: Columns, stats: SplitStats) -> Columns:
        """The rows stored for training (packing goes here)."""
        return columns

    def settings(self) -> dict[str, Any]:
        """Every option of the subclass that changes the prepared data (for the cache key)."""
        return {}

    def collator(self) -> Any:
        return Collator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def prompt_loader(self, samples: list, collate_fn: Callable[[list], Any] = list) -> DataLoader:
        """``samples`` in order, ``val_batch_size`` at a time, for ``predict``. Under several
        processes every rank gets as many (a sharded model's ranks run in lockstep): the
        last is repeated, and the prediction writer drops the repeats by their index."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1 and samples:
            samples = samples + [samples[-1]] * (-len(samples) % world)
        return DataLoader(
            samples, batch_size=self.val_batch_size, collate_fn=collate_fn, shuffle=False
        )

    def add_scores(self, columns: tuple[str, ...], score: Score | None, key: str) -> None:
        """Columns of per-example scores (reference log-probs) on every split, computed by
        ``score`` on collated batches, or loaded from the data cache under ``key`` when a
        run with the same data and scorer stored them. ``score=None``: the cache only
        (``LookupError`` when they are not there)."""
        store = self.cache_path / key if self.cache_path else None
        if any(not hasattr(data, "column_names") for data in self.datasets.values()):
            raise DataError(
                "precomputed scores need prepared data: set data.init_args.streaming false"
            )
        self.datasets = add_scored_columns(
            self.datasets,
            columns,
            score,
            store,
            self.collator(),
            self.val_batch_size,
            label="reference log-probs",
            unit=self.score_unit,
        )

    # ----------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        """Runs once per node before ``setup``: prepares and caches, so other ranks just load."""
        if self.cache_path is not None and not cache.exists(self.cache_path):
            self._prepare_and_cache()
            self.datasets = {}  # setup loads and reports it, like every other rank
            self._prepared_here = True

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if not self._load_cache():
            self._prepare_and_cache()
        for split, stats in self.stats.items():
            rank_zero_info(f"[data] {stats.summary(split)}")
        for split, stats in self.stats.items():
            warning = stats.truncation_warning(split, self.max_length)
            if warning:
                rank_zero_warn(warning)
        self._warn_if_no_validation()
        if any(stats.template for stats in self.stats.values()):
            rank_zero_warn(
                "[data] the chat template dropped part of some conversations or left turns "
                "without a stop token (see the data summary); `python -m "
                "src.preview --check-template --config ...` shows how it renders"
            )
        if not self.streaming and self.stats["train"].examples == 0:
            raise DataError(
                "no training examples left after preparation "
                f"({self.stats['train'].summary('train')})"
            )

    def _warn_if_no_validation(self) -> None:
        val = self.stats.get("val")
        if (
            val is None
            or val.examples
            or self.streaming
            or (not self.val_sources and not self.val_split)
        ):
            return
        held_out = "val_files" if self.val_sources else f"val_split {self.val_split}"
        rank_zero_warn(
            f"[data] val: no validation examples ({held_out} holds none: "
            f"{val.summary('val')}); there will be no val/loss. Give val_files, or val_split "
            "as a number of examples"
        )

    @cached_property
    def cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        settings = {
            "class": type(self).__name__,
            "code": cache.code_version(),
            "train": fingerprint(self.train_sources, self.cache_dir),
            "val": fingerprint(self.val_sources, self.cache_dir),
            "tokenizer": cache.tokenizer_fingerprint(self.tokenizer),
            "streaming": self.streaming,
            **{
                k: getattr(self, k)
                for k in (
                    "val_split",
                    "stratify_by",
                    "format",
                    "mix",
                    "stopping",
                    "max_length",
                    "stop_token",
                    "reasoning",
                )
            },
            "filters": vars(self.filters),
            "seed": self.seed,
            **self.settings(),
        }
        return self.cache_dir / f"{type(self).__name__}-{cache.cache_key(settings)[:24]}"

    def _load_cache(self) -> bool:
        loaded = cache.load(self.cache_path) if self.cache_path else None
        if loaded is None:
            return False
        self.datasets, self.stats, extras = loaded
        self.val_examples = extras["val_examples"]
        if self.streaming:
            self.datasets["train"] = StreamingDataset(self, skip=extras["held_out"])
        if getattr(self, "_prepared_here", False):
            rank_zero_info(f"[data] prepared and cached in {self.cache_path}")
        else:
            rank_zero_info(f"[data] prepared data loaded from the cache {self.cache_path}")
        return True

    def _prepare_and_cache(self) -> None:
        if self.streaming:
            splits, stats, held_out = self._prepare_streaming()
        else:
            splits, held_out = self._prepare(), 0
            stats = self.stats
        extras = {"val_examples": self.val_examples, "held_out": held_out}
        if self.cache_path is not None:
            cache.save(self.cache_path, splits, stats, extras)
        self.datasets = dict(splits)
        if self.streaming:
            self.datasets["train"] = StreamingDataset(self, skip=held_out)

    def _prepare(self) -> dict[str, datasets.Dataset]:
        """Map-style preparation of both splits."""
        if not self.train_sources:
            raise DataError("no training data: set data.train_files")
        train_stats, val_stats = SplitStats(), SplitStats()
        train = list(self._iter_examples(self.train_sources, train_stats))
        if not train:
            paths = ", ".join(s.path for s in self.train_sources)
            raise DataError(f"the training data hold no rows: {paths}")
        seen = {example_hash(e) for e, _, _ in train} if self.filters.dedup else set()
        if self.val_sources:
            val = list(self._iter_examples(self.val_sources, val_stats, seen=seen))
        else:
            strata = self._strata(train)
            train_idx, val_idx = split_indices(len(train), self.val_split, self.seed, strata)
            train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
            train_stats.rows -= len(val)
            val_stats.rows = len(val)
        self.val_examples = [e for e, _, _ in val]
        self.stats = {"train": train_stats, "val": val_stats}
        return {
            "train": self._encode_split(train, train_stats),
            "val": self._encode_split(val, val_stats),
        }

    def _iter_examples(
        self,
        sources: list[Source],
        stats: SplitStats,
        seen: set[bytes] | None = None,
    ) -> Iterator[tuple[Example, str, Any]]:
        """(example, where, stratum) of every row, scrubbed and de-duplicated, counted."""
        seen = set() if seen is None else seen
        for record in mix(sources, self.mix, self.seed, self.stopping, self.streaming):
            stats.rows += 1
            example = self.to_example(record, sources[record.source].format or self.format)
            if self.filters.scrub_pii:
                counts: dict[str, int] = {}
                example = scrub(example, counts)
                for what, n in counts.items():
                    if n:
                        stats.count(f"{what} scrubbed", n)
            if self.filters.dedup:
                key = example_hash(example)
                if key in seen:
                    stats.drop("exact duplicates")
                    continue
                seen.add(key)
            stratum = self._stratum(record, example)
            weight = loss_weight_of(record, sources[record.source])
            if weight != 1.0:
                example["loss_weight"] = weight
            yield example, record.where, stratum

    def _stratum(self, record: Record, example: Example) -> Any:
        if self.stratify_by is None:
            return None
        if self.stratify_by == "length":
            return len(json.dumps(example, ensure_ascii=False))
        if self.stratify_by not in record.row:
            raise DataError(
                f"{record.where}: no column {self.stratify_by!r} to stratify the split by"
            )
        return json.dumps(record.row[self.stratify_by], sort_keys=True, default=str)

    def _strata(self, items: list[tuple[Example, str, Any]]) -> list[Any] | None:
        if self.stratify_by is None:
            return None
        keys = [s for _, _, s in items]
        return length_buckets(keys) if self.stratify_by == "length" else keys

    def _encode_split(
        self, items: list[tuple[Example, str, Any]], stats: SplitStats
    ) -> datasets.Dataset:
        columns, encoded = self.encode_all([e for e, _, _ in items], [w for _, w, _ in items])
        stats.merge(encoded)
        return cache.columns_to_dataset(self.finalize(columns, stats))

    def encode_all(
        self, examples: list[Example], wheres: list[str], parallel: bool = True
    ) -> tuple[Columns, SplitStats]:
        """``encode_chunk`` over all examples, in ``num_proc`` processes, in order."""
        chunks = [
            (examples[i : i + CHUNK], wheres[i : i + CHUNK]) for i in range(0, len(examples), CHUNK)
        ] or [([], [])]  # an empty split still gets its columns
        if (
            parallel
            and self.num_proc > 1
            and len(chunks) > 1
            and "fork" in multiprocessing.get_all_start_methods()
        ):
            global _WORKER_MODULE
            _WORKER_MODULE = self
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
            with multiprocessing.get_context("fork").Pool(self.num_proc) as pool:
                results = pool.map(_encode_in_worker, chunks)
        else:
            results = [self.encode_chunk(*chunk) for chunk in chunks]
        columns: Columns = {}
        stats = SplitStats()
        for chunk_columns, chunk_stats in results:
            for name, values in chunk_columns.items():
                columns.setdefault(name, []).extend(values)
            stats.merge(chunk_stats)
        for name, neutral in NEUTRAL_COLUMNS.items():
            if all(v == neutral for v in columns.get(name, ())):
                columns.pop(name, None)  # e.g. unweighted: no column, no per-token weights
        return columns, stats

    # ------------------------------------------------------------- streaming
    def _prepare_streaming(self) -> tuple[dict[str, datasets.Dataset], dict[str, SplitStats], int]:
        """Validation from ``val_files`` or the first ``val_split`` examples of the stream."""
        if not self.train_sources:
            raise DataError("no training data: set data.train_files")
        val_stats = SplitStats()
        if self.val_sources:
            val, held_out = list(self._iter_examples(self.val_sources, val_stats)), 0
        else:
            held_out = int(self.val_split)
            val = []
            for item in self._iter_examples(self.train_sources, val_stats):
                if len(val) == held_out:
                    break
                val.append(item)
            val_stats.rows = len(val)
        self.val_examples = [e for e, _, _ in val]
        self.stats = {"val": val_stats}
        return {"val": self._encode_split(val, val_stats)}, self.stats, held_out

    def stream_rows(self, skip: int) -> Iterator[dict[str, Any]]:
        """Training rows prepared on the fly, in windows of ``CHUNK * 10`` examples.

        What was truncated or dropped is reported at the end of each pass.
        """
        stats = SplitStats()
        window: list[tuple[Example, str, Any]] = []
        for n, item in enumerate(self._iter_examples(self.train_sources, stats)):
            if n < skip:
                continue
            window.append(item)
            if len(window) == CHUNK * 10:
                yield from self._window_rows(window, stats)
                window = []
        if window:
            yield from self._window_rows(window, stats)
        read = stats.rows  # before the held-out rows come off: zero means empty files
        stats.rows -= skip
        rank_zero_info(f"[data] {stats.summary('train (one pass of the stream)')}")
        if stats.examples == 0:
            paths = ", ".join(s.path for s in self.train_sources)
            if read == 0:
                raise DataError(f"the training data hold no rows: {paths}")
            raise DataError(
                f"the training stream holds no examples: {paths} ({stats.summary('train')})"
            )

    def _window_rows(
        self, window: list[tuple[Example, str, Any]], stats: SplitStats
    ) -> Iterator[dict[str, Any]]:
        # in-process: this may run inside a data-loader worker, which cannot fork
        columns, encoded = self.encode_all(
            [e for e, _, _ in window], [w for _, w, _ in window], parallel=False
        )
        stats.merge(encoded)
        columns = self.finalize(columns, stats)
        names = list(columns)
        for values in zip(*(columns[k] for k in names), strict=True):
            yield dict(zip(names, values, strict=True))

    # ---------------------------------------------------------------- loaders
    def _loader(self, split: str, batch_size: int, shuffle: bool) -> StatefulDataLoader:
        data = self.datasets[split]
        iterable = isinstance(data, IterableDataset)  # streamed: in order, length unknown
        return (PrefetchAwareLoader if iterable else StatefulDataLoader)(
            data,
            batch_size=batch_size,
            shuffle=shuffle and not iterable,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        data = self.datasets["train"]
        if isinstance(data, StreamingDataset) and self.trainer is not None:
            data.rank, data.world_size = self.trainer.global_rank, self.trainer.world_size
        loader = self._loader("train", self.batch_size, shuffle=True)
        if isinstance(loader, PrefetchAwareLoader):
            loader.trainer = self.trainer  # whose look-ahead its checkpointed state leaves out
        return loader

    def val_dataloader(self) -> StatefulDataLoader | list:
        if len(self.datasets.get("val", [])) == 0:
            return []
        return self._loader("val", self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader | list:
        """``test`` evaluates on the validation data (the held-out split or ``val_files``)."""
        return self.val_dataloader()


class PrefetchAwareLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose state leaves out the batches Lightning holds untrained.

    Lightning's training loop fetches a batch ahead of the one it trains on when the loader
    has no length (to know which batch is the last), so when it checkpoints after batch i the
    loader has already produced batch i+1, and a resume from the loader's own state would
    skip that batch. This loader keeps its state from before each of its latest batches and
    reports the one from before the batches still waiting in ``trainer``'s fetcher.
    """

    trainer: pl.Trainer | None = None  # set by ``train_dataloader``; None: no look-ahead
    _before: deque[dict[str, Any]]

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        self._before = deque(maxlen=4)

        def batches() -> Iterator[Any]:
            while True:
                state = copy.deepcopy(super(PrefetchAwareLoader, self).state_dict())
                try:
                    batch = next(iterator)
                except StopIteration:
                    self._before.clear()  # a fetcher that met the end holds nothing back
                    return
                self._before.append(state)
                yield batch

        return batches()

    def state_dict(self) -> dict[str, Any]:
        waiting = prefetched_batches(self.trainer)
        if 0 < waiting <= len(getattr(self, "_before", ())):
            return self._before[-waiting]
        return super().state_dict()


_WORKER_MODULE: BaseDataModule | None = None


def _encode_in_worker(chunk: tuple[list[Example], list[str]]) -> tuple[Columns, SplitStats]:
    assert _WORKER_MODULE is not None  # set by the parent before forking
    return _WORKER_MODULE.encode_chunk(*chunk)
