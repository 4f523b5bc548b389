"""Tool definitions and tool calls as rows store them, in the shapes templates read.

``tools`` may be a list of OpenAI tool objects, of bare function descriptions, or a JSON
string of either (LLaMA-Factory's glaive data); a ShareGPT ``function_call`` turn holds one
call or a list of calls as JSON. Both become OpenAI shapes: ``tools`` a list of
``{"type": "function", "function": {...}}`` and an assistant message with ``tool_calls``.
"""

from __future__ import annotations

import json
from typing import Any

from src.datamodules.records import DataError

Message = dict[str, Any]
Example = dict[str, Any]


def function_call_message(value: Any, where: str) -> Message:
    """A ShareGPT ``function_call`` turn (a JSON string of one call or a list of calls) as an
    assistant message with OpenAI ``tool_calls`` and empty content."""
    calls = _json(value, where, "the value") if isinstance(value, str) else value
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise DataError(
            f"{where}: expected one call or a list of calls, each "
            f'{{"name": ..., "arguments": {{...}}}}, found {kind(calls)}'
        )
    return {"role": "assistant", "content": "", "tool_calls": [_call(c, where) for c in calls]}


def _call(call: Any, where: str) -> dict[str, Any]:
    """One call in OpenAI's shape; arguments are kept as given (an object or a JSON string:
    templates differ in which they take)."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not (
        isinstance(function, dict)
        and isinstance(function.get("name"), str)
        and isinstance(function.get("arguments"), dict | str)
    ):
        raise DataError(
            f"{where}: each call must be an object with a 'name' and 'arguments' (an object), "
            f"found {kind(call)}"
        )
    out = {
        "type": "function",
        "function": {"name": function["name"], "arguments": function["arguments"]},
    }
    if isinstance(call, dict) and call.get("id") is not None:
        out["id"] = call["id"]
    return out


def with_tools(example: Example, row: dict[str, Any], where: str) -> Example:
    tools = _tools(row["tools"], where) if row.get("tools") else None
    if tools:
        example["tools"] = tools
    return example


def _tools(value: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI tool dicts from a list of them, of bare function descriptions, or a JSON string
    of either (LLaMA-Factory's glaive data): templates only iterate over real lists."""
    if isinstance(value, str):
        value = _json(value, where, "'tools'") if value.strip() else []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(
            f"{where}: 'tools' must be a list of tool descriptions (or its JSON), "
            f"found {kind(value)}"
        )
    return [_tool(tool, where, i) for i, tool in enumerate(value)]


def _tool(tool: Any, where: str, i: int) -> dict[str, Any]:
    if isinstance(tool, str):
        tool = _json(tool, where, f"tool {i}")
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        return tool
    if isinstance(tool, dict) and isinstance(tool.get("name"), str):
        return {"type": "function", "function": tool}  # a bare function description
    raise DataError(
        f"{where}: tool {i} must be a function description with a 'name' (or an OpenAI "
        f'{{"type": "function", "function": {{...}}}} object), found {kind(tool)}'
    )


def _json(text: str, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: {what} is not valid JSON ({err.msg} at column {err.colno}): {text[:60]!r}"
        ) from None


def kind(value: Any) -> str:
    """A short description of a wrong value for an error message."""
    if isinstance(value, dict):
        return f"an object with the keys {', '.join(map(str, value)) or '(none)'}"
    if isinstance(value, list) and not value:
        return "an empty list"
    return type(value).__name__
