"""Errors worded for the user: ``train.py`` shows them as one line, not as a traceback.

``DataError`` (the user's data) lives with the data modules and ``DivergenceError`` (a NaN or
Inf loss or gradient) with its callback; these two are for settings and paths.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot work as given."""


class PathNotFoundError(FileNotFoundError):
    """A model, tokenizer, adapter or checkpoint path that does not exist."""


__all__ = ["ConfigError", "PathNotFoundError"]
