"""Data sources and how several are mixed: concatenated, or interleaved by weight (seeded)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from jsonargparse.typing import register_type

from src.datamodules.records import DataError, Record, TextUnit, iter_records, local_files

MixMode = Literal["concat", "interleave"]
Stopping = Literal["first_exhausted", "all_exhausted"]


@dataclass
class Source:
    """One dataset of a mix.

    Args:
        path: A local file (.json, .jsonl, .parquet, .csv, .txt, each maybe gzipped as
            .gz), a directory, a glob, or a hub dataset id.
        weight: Share of the mix when interleaving (normalised over the sources).
        loss_weight: Weight of this source's examples in the loss, relative to the others
            (SFT and preference data): its tokens (pairs) count ``loss_weight`` times in the
            weighted mean of a training step. A row's own ``loss_weight`` field, if any,
            multiplies it.
        format: This source's format (default: the data module's ``format``).
        columns: Our field name -> this dataset's column name, e.g. ``{messages: dialog}``.
        hub_config: Configuration name of a hub dataset.
        split: Split of a hub dataset.
        text_unit: For .txt files: one row per ``document`` (file), ``paragraph`` or ``line``.
        max_rows: Read at most this many rows.
    """

    path: str
    weight: float = 1.0
    loss_weight: float = 1.0
    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    hub_config: str | None = None
    split: str = "train"
    text_unit: TextUnit = "document"
    max_rows: int | None = None

    def __post_init__(self) -> None:
        # checked here, as a config's sources are not type-checked by the parser (see below)
        if self.text_unit not in get_args(TextUnit):
            raise DataError(
                f"source {self.path}: text_unit must be one of {', '.join(get_args(TextUnit))}, "
                f"got {self.text_unit!r}"
            )
        if self.weight <= 0:
            raise DataError(f"source {self.path}: weight must be positive, got {self.weight}")
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise DataError(
                f"source {self.path}: loss_weight must be a finite number >= 0, "
                f"got {self.loss_weight}"
            )

    def records(self, index: int, streaming: bool = False) -> Iterator[Record]:
        """This source's rows, renamed to our field names and tagged with ``index``."""
        rows = iter_records(
            self.path,
            hub_config=self.hub_config,
            split=self.split,
            text_unit=self.text_unit,
            streaming=streaming,
        )
        rename = {theirs: ours for ours, theirs in self.columns.items()}
        for n, record in enumerate(rows):
            if self.max_rows is not None and n >= self.max_rows:
                return
            row = record.row
            if rename:
                row = {rename.get(k, k): v for k, v in row.items()}
            yield Record(row, record.where, index)


def _source_of(value: Any) -> Source:
    """A config's source entry (a mapping) as a ``Source``; weights as floats, as the parser
    gave them when it read sources as dataclasses (the cache key depends on it)."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a mapping with a path, got {value!r}")
    weights = {k: float(value[k]) for k in ("weight", "loss_weight") if k in value}
    return Source(**{**value, **weights})


# Parsed as a registered type, not as a dataclass: jsonargparse reads the *contents* of a file
# named where a dataclass may go, so ``train_files: empty.jsonl`` became None ("no training
# data") and a one-paragraph .txt corpus became its own text. A registered type turns that off.
register_type(Source, serializer=asdict, deserializer=_source_of)


def loss_weight_of(record: Record, source: Source) -> float:
    """A row's loss weight: its source's ``loss_weight`` times the row's own, if it has one."""
    own = record.row.get("loss_weight")
    if own is None:
        return source.loss_weight
    if isinstance(own, bool) or not isinstance(own, int | float) or not own >= 0 or own == math.inf:
        raise DataError(f"{record.where}: loss_weight must be a finite number >= 0, got {own!r}")
    return source.loss_weight * float(own)


def as_sources(value: str | Source | list[str | Source] | None) -> list[Source]:
    """Normalise a config value (a path, a list of paths, or Source entries) to sources."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, Source):
            out.append(item)
        elif isinstance(item, dict):
            out.append(Source(**item))
        else:
            out.append(Source(path=str(item)))
    return out


def mix(
    sources: list[Source],
    mode: MixMode = "concat",
    seed: int = 0,
    stopping: Stopping = "first_exhausted",
    streaming: bool = False,
) -> Iterator[Record]:
    """The rows of all sources, one after another or interleaved with probability ~ weight.

    Interleaving stops when the first source runs out (``first_exhausted``), or restarts
    exhausted sources until every source has been read through once (``all_exhausted``).
    """
    streams: list[Callable[[], Iterator[Record]]] = [
        (lambda i=i, s=s: s.records(i, streaming)) for i, s in enumerate(sources)
    ]
    if mode == "concat" or len(sources) == 1:
        for stream in streams:
            yield from stream()
        return
    rng = random.Random(seed)
    total = sum(s.weight for s in sources)
    probs = [s.weight / total for s in sources]
    iterators = [stream() for stream in streams]
    exhausted = [False] * len(sources)
    choices = range(len(sources))
    while True:
        i = rng.choices(choices, probs)[0]
        try:
            yield next(iterators[i])
            continue
        except StopIteration:
            pass
        exhausted[i] = True
        if stopping == "first_exhausted" or all(exhausted):
            return
        iterators[i] = streams[i]()
        try:
            yield next(iterators[i])
        except StopIteration:  # an empty source can never contribute
            raise DataError(f"source {sources[i].path} holds no rows") from None


def fingerprint(sources: list[Source], memo_dir: Path | None = None) -> str:
    """A digest of the sources' settings and file contents (hub ids by name and split).

    Content hashes are remembered by (path, size, mtime) in ``memo_dir``, so an unchanged
    corpus is not read again to compute its key.
    """
    memo_path = memo_dir / "file_hashes.json" if memo_dir else None
    memo: dict[str, str] = {}
    if memo_path and memo_path.exists():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
    digest = hashlib.sha256()
    for source in sources:
        digest.update(json.dumps(asdict(source), sort_keys=True).encode())
        for path in local_files(source.path) or []:
            stat = path.stat()
            key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
            if time.time() - stat.st_mtime < 2:  # a rewrite within the timestamp's precision
                digest.update(_file_hash(path).encode())  # could keep this key: never memoise
                continue
            if key not in memo:
                memo[key] = _file_hash(path)
            digest.update(memo[key].encode())
    if memo_path:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
