"""Turning raw rows of every supported format into a few canonical shapes.

* chat: ``{"messages": [...], "tools": [...]?}`` (OpenAI-style messages);
* text: ``{"text": str}`` (trained on every token);
* preference: ``{"prompt": [...], "chosen": [...], "rejected": [...], "tools": [...]?}``.

Rows are recognised by their fields (``format: auto``) or by the configured format. A
source's ``columns`` mapping renames other field names to these before detection.
"""

from __future__ import annotations

from typing import Any, Literal

from src.datamodules.records import DataError, Record

Format = Literal[
    "auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference", "text"
]
Message = dict[str, Any]
Example = dict[str, Any]

ROLES = ("system", "user", "assistant", "tool")
# what each format needs, in the order auto-detection tries them
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "preference": ("chosen", "rejected"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
    "ipython": "tool",
}
CHAT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")


def detect_format(row: dict[str, Any], where: str, allowed: tuple[str, ...]) -> str:
    """Name the format of a row from its fields, among the ``allowed`` ones."""
    for name in allowed:
        if all(row.get(f) is not None for f in REQUIRED_FIELDS[name]):
            return name
    expected = " or ".join(f"({', '.join(REQUIRED_FIELDS[n])})" for n in allowed)
    raise DataError(
        f"{where}: cannot tell the format of this row: expected the fields {expected}; "
        f"found ({', '.join(row) or 'no fields'}). Name other columns with a source's "
        "`columns` mapping"
    )


def _checked_format(record: Record, fmt: str, allowed: tuple[str, ...], purpose: str) -> str:
    row, where = record.row, record.where
    name = detect_format(row, where, allowed) if fmt == "auto" else fmt
    if name not in allowed:
        raise DataError(
            f"{where}: format {name!r} cannot be used for {purpose} (expected one of "
            f"{', '.join(allowed)}, or auto); set data.format or the source's format"
        )
    missing = [f for f in REQUIRED_FIELDS[name] if row.get(f) is None]
    if missing:
        raise DataError(
            f"{where}: a {name!r} row needs the fields {', '.join(REQUIRED_FIELDS[name])}; "
            f"missing {', '.join(missing)} (found {', '.join(row) or 'no fields'})"
        )
    return name


def to_sft_example(record: Record, fmt: str = "auto") -> Example:
    """A chat or text example for supervised fine-tuning."""
    name = _checked_format(record, fmt, (*CHAT_FORMATS, "text"), "supervised fine-tuning")
    if name == "text":
        return {"text": _text(record)}
    return to_chat(record, name)


def to_chat(record: Record, fmt: str = "auto") -> Example:
    """A chat example: checked messages (known roles, text content, not empty) and tools."""
    row, where = record.row, record.where
    name = _checked_format(record, fmt, CHAT_FORMATS, "chat data")
    if name == "alpaca":
        messages = _from_alpaca(row)
    elif name == "sharegpt":
        messages = _from_sharegpt(row["conversations"], where)
    elif name == "prompt_completion":
        messages = _turns(row["prompt"], "user", where, "prompt") + _turns(
            row["completion"], "assistant", where, "completion"
        )
    else:
        messages = row["messages"]
    return _with_tools({"messages": check_messages(messages, where)}, row)


def to_text(record: Record, fmt: str = "auto") -> str:
    """The text of a pretraining row."""
    _checked_format(record, fmt, ("text",), "pretraining")
    return _text(record)


def to_preference(record: Record, fmt: str = "auto") -> Example:
    """Prompt, chosen and rejected message lists of a preference row.

    ``prompt`` may be a string or messages; ``chosen``/``rejected`` strings or messages.
    Without a ``prompt``, chosen and rejected are whole conversations whose shared leading
    messages are the prompt.
    """
    row, where = record.row, record.where
    _checked_format(record, fmt, ("preference",), "preference data")
    chosen = _turns(row["chosen"], "assistant", where, "chosen")
    rejected = _turns(row["rejected"], "assistant", where, "rejected")
    if row.get("prompt") is not None:
        prompt = _turns(row["prompt"], "user", where, "prompt")
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    check_messages(prompt, f"{where} (prompt)")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        check_messages(prompt + answer, f"{where} ({name})")
        if answer[0]["role"] != "assistant":
            raise DataError(
                f"{where}: the {name} response must start with an assistant message, "
                f"found {answer[0]['role']!r}"
            )
    return _with_tools({"prompt": prompt, "chosen": chosen, "rejected": rejected}, row)


def _text(record: Record) -> str:
    text = record.row["text"]
    if not isinstance(text, str):
        raise DataError(f"{record.where}: 'text' must be a string, found {type(text).__name__}")
    return text


def _turns(value: Any, role: str, where: str, field: str) -> list[Message]:
    """A string becomes one message of ``role``; a non-empty message list is kept as is."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: {field!r} must be a string or a non-empty list of messages, "
            f"found {type(value).__name__ if value else 'an empty value'}"
        )
    return value


def _with_tools(example: Example, row: dict[str, Any]) -> Example:
    if row.get("tools"):
        example["tools"] = row["tools"]
    return example


def _from_alpaca(row: dict[str, Any]) -> list[Message]:
    prompt = str(row["instruction"])
    if row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}"
    messages = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
    return messages + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": str(row["output"])},
    ]


def _from_sharegpt(turns: Any, where: str) -> list[Message]:
    if not isinstance(turns, list):
        raise DataError(f"{where}: 'conversations' must be a list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: turn {i} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(
                f"{where}: turn {i} has unknown speaker {turn['from']!r} "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


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
