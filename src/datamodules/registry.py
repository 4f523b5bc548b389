"""A dataset registry: one YAML file naming datasets and the mix to train on.

    --data.init_args.datasets configs/datasets/demo_mix.yaml

The file (what LLaMA-Factory's ``dataset_info.json`` gives its users) holds ``datasets``,
named entries with a source's options (``path``, ``format``, ``columns``, ``split``,
``weight``, ``loss_weight``, ...), and ``train`` and optional ``val`` lists naming them (a
name, or a mapping with ``name`` and options that override the entry's). Entries may also be
written in the lists directly. Relative paths are relative to the registry file's folder.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from src.datamodules.records import DataError
from src.datamodules.sources import Source

SOURCE_FIELDS = {f.name for f in fields(Source)}
TOP_LEVEL = ("datasets", "train", "val")


def read_registry(path: str) -> tuple[list[Source], list[Source]]:
    """The train and validation sources of the registry file at ``path``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"dataset registry {path}: no such file")
    try:
        spec = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DataError(f"dataset registry {path}: not valid YAML: {err}") from None
    if not isinstance(spec, dict) or "train" not in spec:
        raise DataError(f"dataset registry {path}: expected a mapping with a `train` list")
    unknown = sorted(set(spec) - set(TOP_LEVEL))
    if unknown:
        raise DataError(
            f"dataset registry {path}: unknown key(s) {', '.join(unknown)} "
            f"(expected {', '.join(TOP_LEVEL)})"
        )
    named = spec.get("datasets") or {}
    if not isinstance(named, dict):
        raise DataError(f"dataset registry {path}: `datasets` must map names to entries")
    return (
        [_source(path, file.parent, named, item) for item in _as_list(path, spec, "train")],
        [_source(path, file.parent, named, item) for item in _as_list(path, spec, "val")],
    )


def _as_list(path: str, spec: dict[str, Any], key: str) -> list[Any]:
    items = spec.get(key) or []
    if not isinstance(items, list):
        raise DataError(f"dataset registry {path}: `{key}` must be a list")
    return items


def _source(path: str, folder: Path, named: dict[str, Any], item: Any) -> Source:
    """A list item (a name, a mapping with ``name``, or a whole entry) as a ``Source``."""
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise DataError(f"dataset registry {path}: expected a name or a mapping, got {item!r}")
    entry = dict(item)
    if "name" in entry:
        name = entry.pop("name")
        if name not in named:
            known = ", ".join(sorted(named)) or "none"
            raise DataError(f"dataset registry {path}: no dataset named {name!r} (known: {known})")
        base = named[name]
        if not isinstance(base, dict):
            raise DataError(f"dataset registry {path}: dataset {name!r} must be a mapping")
        entry = {**base, **entry}
    unknown = sorted(set(entry) - SOURCE_FIELDS)
    if unknown or "path" not in entry:
        problem = f"unknown option(s) {', '.join(unknown)}" if unknown else "no `path`"
        raise DataError(
            f"dataset registry {path}: {problem} in {item!r} "
            f"(options: {', '.join(sorted(SOURCE_FIELDS))})"
        )
    entry["path"] = _resolve(folder, str(entry["path"]))
    for key in ("weight", "loss_weight"):
        if key in entry:
            entry[key] = float(entry[key])
    return Source(**entry)


def _resolve(folder: Path, value: str) -> str:
    """``value`` relative to the registry's folder when something is there, else as given
    (a hub dataset id, or a path relative to where training runs)."""
    candidate = folder / value
    if Path(value).is_absolute() or not (candidate.exists() or list(folder.glob(value))):
        return value
    return str(candidate)
