"""Turning raw rows of the supported formats into one shape: a list of chat messages."""

from __future__ import annotations

from typing import Any, Literal

from src.datamodules.records import DataError, Record

ChatFormat = Literal["auto", "messages", "alpaca"]
Message = dict[str, Any]

ROLES = ("system", "user", "assistant", "tool")
REQUIRED_FIELDS = {"messages": ("messages",), "alpaca": ("instruction", "output")}


def detect_format(row: dict[str, Any], where: str) -> str:
    """Name the format of a row from its fields."""
    for name, fields in REQUIRED_FIELDS.items():
        if all(f in row for f in fields):
            return name
    expected = " or ".join(f"({', '.join(f)})" for f in REQUIRED_FIELDS.values())
    raise DataError(
        f"{where}: cannot tell the format of this row: expected the fields {expected}; "
        f"found ({', '.join(row) or 'no fields'})"
    )


def to_messages(record: Record, fmt: ChatFormat = "auto") -> list[Message]:
    """The conversation held by ``record``, checked: known roles, text content, not empty."""
    row, where = record.row, record.where
    name = detect_format(row, where) if fmt == "auto" else fmt
    missing = [f for f in REQUIRED_FIELDS[name] if row.get(f) is None]
    if missing:
        raise DataError(
            f"{where}: a {name!r} row needs the fields {', '.join(REQUIRED_FIELDS[name])}; "
            f"missing {', '.join(missing)} (found {', '.join(row) or 'no fields'})"
        )
    messages = _from_alpaca(row) if name == "alpaca" else row["messages"]
    return check_messages(messages, where)


def _from_alpaca(row: dict[str, Any]) -> list[Message]:
    prompt = str(row["instruction"])
    if row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}"
    messages = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
    return messages + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": str(row["output"])},
    ]


def check_messages(messages: Any, where: str) -> list[Message]:
    """Raise a ``DataError`` naming ``where`` unless ``messages`` is a usable conversation."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: empty conversation (expected a non-empty list of messages)")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise DataError(
                f"{where}: message {i} has unknown role {msg['role']!r} "
                f"(expected one of {', '.join(ROLES)})"
            )
        if not isinstance(msg.get("content"), str) and not msg.get("tool_calls"):
            raise DataError(f"{where}: message {i} ({msg['role']}) has no text 'content'")
    return messages
