"""Reading raw rows from local files or the Hugging Face hub, with errors that name their place.

Every row travels with its location (``file:line`` or ``source row N``) so that a bad row is
reported where the user can find it, not as a traceback from inside a library.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = {".json", ".jsonl", ".parquet"}


class DataError(ValueError):
    """A problem with the user's data, worded for the user."""


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from."""

    row: dict[str, Any]
    where: str


def read_records(
    source: str, *, hub_config: str | None = None, split: str = "train"
) -> list[Record]:
    """Read every row of a local JSON/JSONL/Parquet file, or of a hub dataset id."""
    path = Path(source)
    if path.exists():
        return list(_read_local(path))
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/")):
        raise DataError(f"data file not found: {source}")
    return list(_read_hub(source, hub_config, split))


def _read_local(path: Path) -> Iterator[Record]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r} (expected one of "
            f"{', '.join(sorted(LOCAL_SUFFIXES))})"
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.start}): {err.reason}") from None


def _read_jsonl(path: Path) -> Iterator[Record]:
    # split on "\n" only: str.splitlines() also breaks on U+2028 and friends, which JSON
    # allows unescaped inside strings
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
        yield Record(_as_object(row, where), where)


def _read_json(path: Path) -> Iterator[Record]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = (
            " (one JSON object per line? name the file .jsonl)" if err.msg == "Extra data" else ""
        )
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg}){hint}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style containers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows or an object holding one list")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows, found {type(data).__name__}")
    for i, row in enumerate(data):
        where = f"{path} row {i}"
        yield Record(_as_object(row, where), where)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: cannot read as Parquet ({err})") from None
    for i, row in enumerate(table.to_pylist()):
        yield Record(row, f"{path} row {i}")


def _read_hub(source: str, hub_config: str | None, split: str) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(source, hub_config, split=split)
    except Exception as err:  # network, auth, missing dataset: all reported the same way
        raise DataError(
            f"{source!r} is neither a local file nor a loadable hub dataset ({err})"
        ) from None
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{source}[{split}] row {i}")


def _as_object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(row).__name__}")
    return row
