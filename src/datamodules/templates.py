"""Chat templates: the tokenizer's own, a built-in one by name, or a Jinja file."""

from __future__ import annotations

from pathlib import Path

from src.datamodules.records import DataError

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def resolve_chat_template(spec: str | None) -> str | None:
    """The Jinja text of ``spec``: a built-in name, a file path, or an inline template.

    ``None`` keeps the tokenizer's own template.
    """
    if spec is None:
        return None
    if spec in BUILTIN_TEMPLATES:
        return (TEMPLATE_DIR / f"{spec}.jinja").read_text(encoding="utf-8")
    if "{%" in spec or "{{" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise DataError(
        f"unknown chat template {spec!r}: expected a built-in name "
        f"({', '.join(BUILTIN_TEMPLATES)}) or the path of a Jinja file"
    )
