"""Reading raw rows from local files or the Hugging Face hub, with errors that name their place.

Every row travels with its location (``file:line`` or ``source row N``) so that a bad row is
reported where the user can find it, not as a traceback from inside a library. Readers are
generators, so a streamed corpus never has to fit in memory. Every local type may also be
gzip-compressed (``.jsonl.gz``, ``.csv.gz``...), read as it is decompressed.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

LOCAL_SUFFIXES = {".json", ".jsonl", ".parquet", ".csv", ".txt"}
GZIP = ".gz"
# what a broken or truncated gzip stream raises (BadGzipFile is an OSError)
READ_ERRORS = (OSError, EOFError, zlib.error)
# an object holding a list under one of these is one chat row, not a container of rows
CHAT_KEYS = ("messages", "conversations")
TextUnit = Literal["document", "paragraph", "line"]


class DataError(ValueError):
    """A problem with the user's data, worded for the user."""


@dataclass(frozen=True)
class Record:
    """One raw row, where it came from, and which configured source it belongs to."""

    row: dict[str, Any]
    where: str
    source: int = 0


def read_records(
    source: str,
    *,
    hub_config: str | None = None,
    split: str = "train",
    text_unit: TextUnit = "document",
) -> list[Record]:
    """Every row of a local file, a directory, a glob, or a hub dataset id."""
    return list(iter_records(source, hub_config=hub_config, split=split, text_unit=text_unit))


def iter_records(
    source: str,
    *,
    hub_config: str | None = None,
    split: str = "train",
    text_unit: TextUnit = "document",
    streaming: bool = False,
) -> Iterator[Record]:
    """The rows of ``source`` one at a time (hub datasets are streamed when ``streaming``)."""
    files = local_files(source)
    if files is None:
        yield from _read_hub(source, hub_config, split, streaming)
        return
    for path in files:
        yield from _read_local(path, text_unit)


def local_files(source: str) -> list[Path] | None:
    """The files ``source`` names (a file, a directory, a glob), or None for a hub id."""
    if glob.has_magic(source):
        matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"no file matches {source}")
        return matches
    path = Path(source)
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*") if p.is_file() and data_suffix(p) in LOCAL_SUFFIXES
        )
        if not found:
            raise DataError(f"{source}: the directory holds no data files ({_known_types()})")
        return found
    if path.exists():
        return [path]
    if data_suffix(path) in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"data file not found: {source}")
    return None


def data_suffix(path: Path) -> str:
    """The data type of a file: its suffix, or the one before ``.gz`` when it is gzipped."""
    if path.suffix == GZIP and len(path.suffixes) > 1:
        return path.suffixes[-2]
    return path.suffix


def _known_types() -> str:
    return f"{', '.join(sorted(LOCAL_SUFFIXES))}, each may be gzipped: {GZIP}"


def _read_local(path: Path, text_unit: TextUnit) -> Iterator[Record]:
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".parquet": _read_parquet,
        ".csv": _read_csv,
    }
    kind = data_suffix(path)
    if kind == ".txt":
        yield from _read_txt(path, text_unit)
    elif kind in readers:
        yield from readers[kind](path)
    else:
        given = kind + GZIP if path.suffix == GZIP and kind != GZIP else kind
        raise DataError(
            f"{path}: unsupported file type {given!r} (expected one of {_known_types()})"
        )


def _open(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed on the fly when it is gzipped."""
    return gzip.open(path, "rb") if path.suffix == GZIP else path.open("rb")


def _raw_lines(path: Path) -> Iterator[bytes]:
    """The byte lines of a file; a gzip stream that breaks names the line it broke at."""
    with _open(path) as f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except READ_ERRORS as err:
                raise DataError(f"{path}:{lineno + 1}: {_unreadable(path, err)}") from None
            if not raw:
                return
            lineno += 1
            yield raw


def _unreadable(path: Path, err: Exception) -> str:
    if path.suffix == GZIP:
        return f"not a valid gzip file, or cut short ({err or type(err).__name__})"
    return f"cannot read the file ({err})"


def _lines(path: Path, keep_ends: bool = False) -> Iterator[str]:
    """The lines of a UTF-8 file, split on "\\n" only, read lazily.

    ``str.splitlines()`` (and text-mode iteration) also break on U+2028 and friends, which
    JSON allows unescaped inside strings.
    """
    for lineno, raw in enumerate(_raw_lines(path), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}:{lineno}: not valid UTF-8 (byte {err.start}): {err.reason}"
            ) from None
        yield line if keep_ends else line.rstrip("\r\n")


def _read_text(path: Path) -> str:
    try:
        with _open(path) as f:
            data = f.read()
    except READ_ERRORS as err:
        raise DataError(f"{path}: {_unreadable(path, err)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.start}): {err.reason}") from None


def _read_jsonl(path: Path) -> Iterator[Record]:
    for lineno, line in enumerate(_lines(path), start=1):
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
    for i, row in enumerate(_json_rows(data, path)):
        where = f"{path} row {i}"
        yield Record(_as_object(row, where), where)


def _json_rows(data: Any, path: Path) -> list[Any]:
    """The rows of a JSON document: a list, or the one list of objects an object holds
    (``{"data": [...]}``, ``{"train": [...]}``); ``{"messages": [...]}`` is one row."""
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a list of rows, found {type(data).__name__}")
    keys = [
        k for k, v in data.items() if isinstance(v, list) and all(isinstance(r, dict) for r in v)
    ]
    if any(k in CHAT_KEYS for k in keys):  # a chat row's own lists: messages, tools
        return [data]
    if len(keys) == 1:
        return data[keys[0]]
    if keys:
        raise DataError(
            f"{path}: the object holds several lists of rows ({', '.join(map(repr, keys))}); "
            f"keep the one to train on, e.g. `jq '.{keys[0]}' {path.name} > rows.json`, or "
            "give each as its own file"
        )
    raise DataError(
        f"{path}: expected a list of rows, or an object holding them as a list under one key "
        f'(e.g. {{"data": [...]}}); found an object with {_keys(data)} and no list of objects '
        "(one row? write it as [{...}], or as a line of a .jsonl file)"
    )


def _keys(data: dict[str, Any]) -> str:
    return f"the keys {', '.join(map(repr, data))}" if data else "no keys"


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:  # a gzipped file is read through a seekable decompressing stream
        batches = pq.ParquetFile(_open(path) if path.suffix == GZIP else path).iter_batches(
            batch_size=4096
        )
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield Record(row, f"{path} row {i}")
                i += 1
    except DataError:
        raise
    except Exception as err:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: cannot read as Parquet ({err})") from None


def _read_csv(path: Path) -> Iterator[Record]:
    """Rows of a CSV file with a header line; JSON in a cell (a message list) is decoded."""
    reader = csv.DictReader(_lines(path, keep_ends=True))
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():
                raise DataError(
                    f"{where}: {len(reader.fieldnames or [])} columns in the header, "
                    "a different number in this row"
                )
            yield Record({k: _maybe_json(v) for k, v in row.items()}, where)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None


def _maybe_json(cell: str) -> Any:
    if cell[:1] in "[{":
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    return cell


def _read_txt(path: Path, unit: TextUnit) -> Iterator[Record]:
    """Plain text as ``text`` rows: the whole file, each paragraph, or each line."""
    if unit == "line":
        for lineno, line in enumerate(_lines(path), start=1):
            if line.strip():
                yield Record({"text": line}, f"{path}:{lineno}")
        return
    text = _read_text(path)
    if unit == "document":
        if text.strip():
            yield Record({"text": text}, str(path))
        return
    for i, para in enumerate(p for p in re.split(r"\n\s*\n", text) if p.strip()):
        yield Record({"text": para.strip("\n")}, f"{path} paragraph {i}")


def _read_hub(source: str, hub_config: str | None, split: str, streaming: bool) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(source, hub_config, split=split, streaming=streaming)
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
