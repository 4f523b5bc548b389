"""Every callback class is importable as ``src.callbacks.<Name>``, as configs name them."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import lightning.pytorch as pl

import src.callbacks
from tests.conftest import ROOT


def defined_callbacks() -> dict[str, type]:
    found = {}
    for info in pkgutil.iter_modules(src.callbacks.__path__):
        module = importlib.import_module(f"src.callbacks.{info.name}")
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, pl.Callback)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[name] = value
    return found


def test_every_callback_class_is_exported():
    callbacks = defined_callbacks()
    assert len(callbacks) >= 10
    missing = sorted(n for n in callbacks if getattr(src.callbacks, n, None) is not callbacks[n])
    assert not missing, f"not importable as src.callbacks.<Name>: {missing}"
    unlisted = sorted(set(callbacks) - set(src.callbacks.__all__))
    assert not unlisted, f"missing from src.callbacks.__all__: {unlisted}"


def test_every_class_path_under_src_callbacks_resolves():
    texts = [p.read_text(encoding="utf-8") for p in (ROOT / "configs").rglob("*.yaml")]
    texts += [
        (ROOT / "README.md").read_text(encoding="utf-8"),
        (ROOT / "src" / "cli.py").read_text(encoding="utf-8"),
    ]
    named = {n for t in texts for n in re.findall(r"src\.callbacks\.([A-Z]\w*)", t)}
    assert named, "no src.callbacks.<Name> found in configs/, README.md, src/cli.py"
    assert not sorted(n for n in named if not hasattr(src.callbacks, n))
