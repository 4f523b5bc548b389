"""Tell a mistyped local path from a hub id before ``from_pretrained`` sees it.

``from_pretrained`` treats any name it cannot find on disk as a hub id: a typo in a local
path then costs a minute of network retries and ends in an error about the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from src.errors import PathNotFoundError


def looks_local(name_or_path: str) -> bool:
    """Whether a name can only mean a file or directory: a hub id is ``name`` or
    ``org/name``, so anything else shaped like a path, or under a local directory, is one."""
    return (
        os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or "\\" in name_or_path
        or name_or_path.count("/") > 1
        or name_or_path.endswith("/")
        or Path(name_or_path.split("/", 1)[0]).is_dir()  # runs/hf when runs/ exists
    )


def check_local_path(name_or_path: str, what: str) -> None:
    """Raise ``PathNotFoundError`` for a local-looking ``name_or_path`` that does not exist;
    hub ids (``gpt2``, ``Qwen/Qwen2.5-0.5B``) and existing paths pass untouched.

    Args:
        name_or_path: The value given for the model, tokenizer or adapter.
        what: What it names, for the message (``model``, ``tokenizer``...).
    """
    if not Path(name_or_path).exists() and looks_local(name_or_path):
        raise PathNotFoundError(
            f"{what} not found: {name_or_path} (no such file or directory; "
            "a hub id looks like org/name)"
        )
