"""On-disk cache of prepared datasets, keyed by everything that changes the result.

A key digests the code of the data pipeline, the sources (file contents), the tokenizer and
its chat template, and every setting of the data module. A second run of the same config
loads the memory-mapped Arrow files and does no processing; under DDP the work happens
once (``prepare_data`` on rank 0) and the other ranks load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict
from itertools import accumulate, chain
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from src.datamodules.chat import clear_padding
from src.datamodules.stats import SplitStats

CODE_DIR = Path(__file__).parent
# modules that do not change what is stored
NOT_IN_KEY = {
    "cache.py",
    "collate.py",
    "preview.py",
    "stats.py",
    "streaming.py",
    "template_check.py",
    "__init__.py",
}


def code_version() -> str:
    """A digest of the data pipeline's code that shapes prepared data, and the templates."""
    digest = hashlib.sha256()
    files = [p for p in CODE_DIR.glob("*.py") if p.name not in NOT_IN_KEY]
    for path in sorted([*files, *CODE_DIR.glob("templates/*.jinja")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256()
    if tokenizer.is_fast:  # without the padding state a batched call may have left
        clear_padding(tokenizer)
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(json.dumps(tokenizer.chat_template, sort_keys=True).encode())
    digest.update(type(tokenizer).__name__.encode())
    return digest.hexdigest()


def cache_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def columns_to_dataset(columns: dict[str, list]) -> datasets.Dataset:
    """A dataset from Python columns; lists of ints become Arrow list<int32> directly, lists
    of floats (per-document loss weights) list<float32>."""
    arrays = {}
    for name, values in columns.items():
        if not values or isinstance(values[0], list):  # token columns (empty: typed alike)
            offsets = pa.array([0, *accumulate(len(v) for v in values)], type=pa.int64())
            items = list(chain.from_iterable(values))
            kind = pa.float32() if items and isinstance(items[0], float) else pa.int32()
            flat = pa.array(items, type=kind)
            arrays[name] = pa.LargeListArray.from_arrays(offsets, flat)
        else:
            arrays[name] = pa.array(values)
    return datasets.Dataset(pa.table(arrays))


def save(
    path: Path,
    splits: dict[str, datasets.Dataset],
    stats: dict[str, SplitStats],
    extras: dict[str, Any],
) -> None:
    """Write atomically: a reader never sees a half-written cache entry."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        for split, ds in splits.items():
            if len(ds):  # datasets cannot load a saved empty table; load() recreates it
                ds.save_to_disk(str(tmp / split))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    (tmp / "stats.json").write_text(json.dumps({k: asdict(v) for k, v in stats.items()}))
    (tmp / "extras.json").write_text(json.dumps(extras, ensure_ascii=False))
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


def exists(path: Path) -> bool:
    return (path / "stats.json").exists()


def load(
    path: Path,
) -> tuple[dict[str, datasets.Dataset], dict[str, SplitStats], dict[str, Any]] | None:
    if not exists(path):
        return None
    stats = {k: SplitStats(**v) for k, v in json.loads((path / "stats.json").read_text()).items()}
    splits = {
        split: datasets.load_from_disk(str(path / split))
        if (path / split).exists()
        else columns_to_dataset({"input_ids": []})
        for split in stats
    }
    return splits, stats, json.loads((path / "extras.json").read_text())


Score = Callable[[dict[str, Any]], dict[str, Any]]  # a collated batch -> a value per row


def add_scored_columns(
    splits: dict[str, datasets.Dataset],
    columns: tuple[str, ...],
    score: Score | None,
    store: Path | None,
    collate: Callable[[list[dict]], dict[str, Any]],
    batch_size: int,
    label: str = "scores",
    unit: str = "rows",
) -> dict[str, datasets.Dataset]:
    """The splits with ``columns`` added: loaded from ``store/<split>`` when a run stored
    them, else computed by ``score`` batch by batch and stored there.

    ``score=None`` means they can no longer be computed: a split that needs them and finds
    none stored raises ``LookupError`` naming it.
    """
    if score is None:
        missing = [
            split
            for split, data in splits.items()
            if len(data)
            and columns[0] not in data.column_names
            and (store is None or not (store / split).exists())
        ]
        if missing:
            raise LookupError(f"{', '.join(columns)} of {', '.join(missing)} are not stored")
    out = dict(splits)
    for split, data in splits.items():
        if len(data) == 0 or columns[0] in data.column_names:
            continue
        if store is not None and (store / split).exists():
            out[split] = datasets.load_from_disk(str(store / split))
            continue
        values: dict[str, list] = {name: [] for name in columns}
        every = max(1, -(-len(data) // batch_size) // 10)  # about ten lines a split, in any log
        for n, start in enumerate(range(0, len(data), batch_size)):
            rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            for name, value in score(collate(rows)).items():  # a tensor, or one per row
                parts = value if isinstance(value, list) else [value]
                for part in parts:
                    as_list = part.detach().float().cpu().tolist()
                    values[name] += [as_list] if isinstance(value, list) else as_list
            done, total = start + len(rows), len(data)
            if (n + 1) % every == 0 or done == total:
                rank_zero_info(f"[data] {label} of {split}: {done}/{total} {unit}")
        for name in columns:
            data = data.add_column(name, values[name])
        if store is not None:  # written aside, then renamed: ranks may race
            tmp = store / f"{split}.tmp-{uuid.uuid4().hex[:8]}"
            data.save_to_disk(str(tmp))
            try:
                os.rename(tmp, store / split)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
            data = datasets.load_from_disk(str(store / split))
        out[split] = data
    return out
