"""Every touch of another library's private names, one named function each."""

from __future__ import annotations

from typing import Any


def attached_trainer(module: Any) -> Any:
    """A LightningModule's trainer, or None when detached (Lightning's ``_trainer``; the
    public ``trainer`` property raises instead)."""
    return module._trainer
