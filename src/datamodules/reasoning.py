"""What is trained of an assistant turn's reasoning (``reasoning_content`` or ``<think>``).

- ``template``: what the chat template renders (Qwen3 keeps the reasoning of turns after
  the last user query, DeepSeek-R1 drops all of it, gpt-oss keeps the last turn's).
- ``strip``: no reasoning anywhere.
- ``keep_last``: the last assistant turn's reasoning only; ``keep_all``: every turn's.
  Reasoning the template drops is put back in the template's own form (read from a probe of
  a last turn with reasoning), or as ``<think>\\n...\\n</think>\\n\\n`` where the template
  never writes any. The ids then differ from ``apply_chat_template`` by that text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import jinja2

from src.datamodules.turns import RenderFn, Turn, content_text, tool_names

Reasoning = Literal["template", "strip", "keep_last", "keep_all"]
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
Message = dict[str, Any]


def reasoning_of(message: Message) -> str:
    """The reasoning a message carries: a reasoning field, or a ``<think>`` block."""
    for field in REASONING_FIELDS:
        value = message.get(field)
        if isinstance(value, str) and value.strip():
            return value.strip()
    content = message.get("content")
    if isinstance(content, str) and "</think>" in content:
        return content.split("</think>")[0].split("<think>")[-1].strip()
    return ""


def without_reasoning(message: Message) -> Message:
    out = {k: v for k, v in message.items() if k not in REASONING_FIELDS}
    content = out.get("content")
    if isinstance(content, str) and "</think>" in content:
        out["content"] = content.split("</think>")[-1].lstrip("\n")
    return out


def messages_for(messages: list[Message], policy: Reasoning) -> list[Message]:
    """The messages to render under ``policy`` (reasoning removed where it is not trained)."""
    if policy in ("template", "keep_all"):
        return messages
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return [
        without_reasoning(m) if m["role"] == "assistant" and (policy == "strip" or i != last) else m
        for i, m in enumerate(messages)
    ]


@dataclass(frozen=True)
class Frame:
    """How the template writes reasoning before an answer: ``open + reasoning + close``;
    ``close`` is ``core`` and the header of the answer that follows (gpt-oss:
    ``<|end|><|start|>assistant`` then ``<|channel|>final<|message|>``)."""

    open: str = "<think>\n"
    close: str = "\n</think>\n\n"
    core: str = "\n</think>\n\n"


def learn_frame(render: RenderFn) -> Frame:
    """The template's own reasoning form, from a last turn with reasoning; else the default."""
    reasoning, answer = "Probe reasoning.", "Probe answer."
    user = [{"role": "user", "content": "Probe question."}]
    try:
        prompt = render(user, add_generation_prompt=True)
        text = render([*user, {"role": "assistant", "content": answer, "thinking": reasoning}])
        plain = render([*user, {"role": "assistant", "content": answer}])
    except (jinja2.TemplateError, ValueError, TypeError):
        return Frame()
    if not text.startswith(prompt):
        return Frame()
    body = text[len(prompt) :]
    r, a = body.find(reasoning), body.find(answer)
    if not 0 <= r < a:
        return Frame()
    close = body[r + len(reasoning) : a]
    header = plain[len(prompt) : plain.find(answer)] if plain.startswith(prompt) else ""
    core = close[: len(close) - len(header)] if header and close.endswith(header) else close
    return Frame(body[:r], close, core)


def _answer_start(text: str, turn: Turn, message: Message) -> int:
    """Where the turn's content (else its first tool call, else its closing token) starts."""
    limit = turn.end - len(turn.closer) if turn.closer else turn.end
    for anchor in (content_text(message), *tool_names(message)[:1]):
        pos = text.rfind(anchor, turn.start, limit) if anchor else -1
        if pos >= 0:
            return pos
    return limit


def splice(
    text: str, turns: list[Turn], messages: list[Message], policy: Reasoning, frame: Frame
) -> tuple[str, list[Turn]]:
    """Put back the reasoning the template dropped from the turns ``policy`` trains it on."""
    if policy not in ("keep_all", "keep_last"):
        return text, turns
    assistants = [m for m in messages if m["role"] == "assistant"]
    out = list(turns)
    for k in reversed(range(len(turns))):
        if policy == "keep_last" and k != len(turns) - 1:
            continue
        turn, reasoning = out[k], reasoning_of(assistants[k])
        if not reasoning or reasoning in text[turn.start : turn.end]:
            continue
        pos = _answer_start(text, turn, assistants[k])
        pre, block = text[turn.start : pos], frame.open + reasoning + frame.close
        empty = frame.open + frame.close
        if empty in pre:  # an empty block (GLM): fill it
            at = pre.index(empty)
            new = pre[:at] + block + pre[at + len(empty) :]
        elif frame.close.endswith(pre):  # the answer's own header (gpt-oss's final), or none
            new = block
        else:  # something else opens the turn (a tool call): reasoning, then it
            new = frame.open + reasoning + frame.core + pre
        text = text[: turn.start] + new + text[pos:]
        delta = len(new) - len(pre)
        skip = len(turn.lead) if turn.lead and new.startswith(turn.lead) else 0
        out[k] = replace(turn, start=turn.start + skip, end=turn.end + delta, lead="")
        for j in range(k + 1, len(out)):
            out[j] = replace(out[j], start=out[j].start + delta, end=out[j].end + delta)
    return text, out
