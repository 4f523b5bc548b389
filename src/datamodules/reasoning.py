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

from src.datamodules.turns import RenderFn, Turn, content_text

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
    """How the template writes reasoning before an answer: ``open + reasoning + close``."""

    open: str = "<think>\n"
    close: str = "\n</think>\n\n"


def learn_frame(render: RenderFn) -> Frame:
    """The template's own reasoning form, from a last turn with reasoning; else the default."""
    reasoning, answer = "Probe reasoning.", "Probe answer."
    user = [{"role": "user", "content": "Probe question."}]
    try:
        prompt = render(user, add_generation_prompt=True)
        text = render([*user, {"role": "assistant", "content": answer, "thinking": reasoning}])
    except (jinja2.TemplateError, ValueError, TypeError):
        return Frame()
    if not text.startswith(prompt):
        return Frame()
    body = text[len(prompt) :]
    r, a = body.find(reasoning), body.find(answer)
    if not 0 <= r < a:
        return Frame()
    return Frame(body[:r], body[r + len(reasoning) : a])


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
        content = content_text(assistants[k])
        pos = text.rfind(content, turn.start, turn.end) if content else -1
        pos = turn.start if pos < 0 else pos
        pre, block = text[turn.start : pos], frame.open + reasoning + frame.close
        if pre.endswith(frame.open + frame.close):  # an empty block (GLM): fill it
            new = pre[: len(pre) - len(frame.open + frame.close)] + block
        elif frame.close.endswith(pre):  # gpt-oss: the close ends with the final header
            new = block
        else:
            new = block + pre
        text = text[: turn.start] + new + text[pos:]
        delta = len(new) - len(pre)
        skip = len(turn.lead) if turn.lead and new.startswith(turn.lead) else 0
        out[k] = replace(turn, start=turn.start + skip, end=turn.end + delta, lead="")
        for j in range(k + 1, len(out)):
            out[j] = replace(out[j], start=out[j].start + delta, end=out[j].end + delta)
    return text, out
