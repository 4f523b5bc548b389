"""Turning raw rows of every supported format into a few canonical shapes.

* chat: ``{"messages": [...], "tools": [...]?}`` (OpenAI-style messages, text content);
* text: ``{"text": str}`` (trained on every token);
* preference: ``{"prompt": [...], "chosen": [...], "rejected": [...], "tools": [...]?}``;
* unpaired: ``{"prompt": [...], "completion": [...], "label": bool, "tools": [...]?}`` (KTO),
  read from any chat format whose row has a boolean ``label`` or ``kto_tag``.

Every format is one row of ``FORMATS``: its name, the fields its rows need, the shape it
becomes and the function that reads it; the table's order is the order ``format: auto``
tries them in. Each shape's reader checks the result alike for every format: to_chat and
to_sft_example (SFT) read chat, to_text (pretraining) and to_sft_example read text,
to_preference (DPO) reads preference, and to_unpaired (KTO) reads chat with a label.

A source's ``columns`` mapping renames other field names to these before detection. What
peers store in other shapes is brought to these here: tools as a JSON string, ShareGPT
``function_call`` turns, content as typed parts, hh-rlhf transcripts, single-turn chosen and
rejected objects (LLaMA-Factory). Rows that cannot be trained as asked (unpaired KTO rows or
preference rows given to SFT or DPO) are refused with what to do instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from src.datamodules.records import DataError, Record
from src.datamodules.tool_calls import function_call_message, kind, with_tools

Message = dict[str, Any]
Example = dict[str, Any]
Shape = Literal["chat", "text", "preference"]

ROLES = ("system", "user", "assistant", "tool")
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
KTO_FIELDS = ("label", "kto_tag")  # TRL's unpaired preference rows; LLaMA-Factory's KTO column
KTO_DATA = "src.datamodules.UnpairedPreferenceDataModule (configs/kto.yaml)"
HH_SPEAKERS = {"Human": "user", "Assistant": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_SHAPE = "'\\n\\nHuman: ...\\n\\nAssistant: ...'"


@dataclass(frozen=True)
class Format:
    """A row format: the fields its rows need, and how such a row becomes its shape.

    ``read`` returns the raw messages (chat), the text (text), or the prompt, chosen and
    rejected messages (preference); what reads the shape checks them. ``detected``: whether
    ``format: auto`` recognises the format from its fields, or it is used only when named.
    """

    name: str
    fields: tuple[str, ...]
    shape: Shape
    read: Callable[[Record], Any]
    detected: bool = True

    def matches(self, row: dict[str, Any]) -> bool:
        return all(row.get(f) is not None for f in self.fields)

    def missing(self, row: dict[str, Any]) -> list[str]:
        return [f for f in self.fields if row.get(f) is None]


# ------------------------------------------------------------------ the formats


def _read_messages(record: Record) -> list[Message]:
    return record.row["messages"]


def _read_sharegpt(record: Record) -> list[Message]:
    row = record.row
    return _from_sharegpt(row["conversations"], record.where, row.get("system"))


def _read_alpaca(record: Record) -> list[Message]:
    prompt = _alpaca_prompt(record.row, record.where)
    return prompt + [{"role": "assistant", "content": str(record.row["output"])}]


def _read_prompt_completion(record: Record) -> list[Message]:
    row, where = record.row, record.where
    prompt = _turns(row["prompt"], "user", where, "prompt")
    return prompt + _turns(row["completion"], "assistant", where, "completion")


def _read_hh_rlhf(record: Record) -> list[Message]:
    text = _read_text(record)
    turns = hh_transcript(text)
    if turns is None:
        raise DataError(
            f"{record.where}: a 'hh_rlhf' row's text must be a Human/Assistant transcript "
            f"({HH_SHAPE}), found {text[:40]!r}"
        )
    return turns


def _read_text(record: Record) -> str:
    text = record.row["text"]
    if not isinstance(text, str):
        raise DataError(f"{record.where}: 'text' must be a string, found {type(text).__name__}")
    return text


def _read_preference(record: Record) -> Example:
    """Prompt, chosen and rejected messages; without a stated prompt, chosen and rejected are
    whole conversations whose shared leading messages are the prompt."""
    row, where = record.row, record.where
    chosen = _response(row["chosen"], where, "chosen")
    rejected = _response(row["rejected"], where, "rejected")
    prompt = _preference_prompt(row, where)
    if prompt is None:
        prompt, chosen, rejected = _split_shared_start(chosen, rejected, where)
    else:
        chosen, rejected = _after(prompt, chosen), _after(prompt, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# In the order `format: auto` tries them: a row with chosen and rejected beside a conversation
# is preference data. An hh_rlhf row is a text row whose text is a transcript, and reading
# every "Human: ..." text as a conversation would be a guess, so it is used only when named.
FORMATS: tuple[Format, ...] = (
    Format("preference", ("chosen", "rejected"), "preference", _read_preference),
    Format("messages", ("messages",), "chat", _read_messages),
    Format("sharegpt", ("conversations",), "chat", _read_sharegpt),
    Format("alpaca", ("instruction", "output"), "chat", _read_alpaca),
    Format("prompt_completion", ("prompt", "completion"), "chat", _read_prompt_completion),
    Format("hh_rlhf", ("text",), "chat", _read_hh_rlhf, detected=False),
    Format("text", ("text",), "text", _read_text),
)


def format_names(*shapes: Shape) -> tuple[str, ...]:
    """The names of the formats that become one of ``shapes`` (all formats without any)."""
    return tuple(f.name for f in FORMATS if not shapes or f.shape in shapes)


# ------------------------------------------------------------------ detection


def detect_format(row: dict[str, Any], where: str, allowed: tuple[str, ...]) -> str:
    """Name the format of a row from its fields: the first of the ``allowed`` ones in
    ``FORMATS`` that it matches."""
    guessable = [f for f in FORMATS if f.detected and f.name in allowed]
    found = next((f for f in guessable if f.matches(row)), None)
    if found is not None:
        return found.name
    expected = " or ".join(f"({', '.join(f.fields)})" for f in guessable)
    raise DataError(
        f"{where}: cannot tell the format of this row: expected the fields {expected}; "
        f"found ({', '.join(row) or 'no fields'}). Name other columns with a source's "
        f"`columns` mapping{_misfit_hint(row, allowed)}"
    )


def _misfit_hint(row: dict[str, Any], allowed: tuple[str, ...]) -> str:
    """What to do with a row of a kind the caller cannot train (said in the detection error)."""
    if _kto_field(row):
        return (
            ". These look like unpaired preference rows (a boolean label: KTO data): train them "
            f"with {KTO_DATA}; for DPO, pair a desirable and an undesirable completion of the "
            "same prompt as chosen and rejected"
        )
    if row.get("segments") is not None:
        return (
            ". Template-free segments (axolotl's input_output) are not supported yet: write "
            "the segments to train as assistant turns of a `messages` conversation, or, to "
            "train every segment, join them as a `text` row"
        )
    if "preference" not in allowed and _has_pair(row):
        return (
            ". These are preference rows (chosen, rejected): train them with "
            "src.datamodules.PreferenceDataModule (configs/dpo.yaml); to fine-tune on the "
            "chosen responses, map them with a source's `columns` (`columns: {messages: "
            "chosen}` for whole conversations, `columns: {text: chosen}` with "
            "`format: hh_rlhf` for Human/Assistant transcripts)"
        )
    return ""


def _checked_format(record: Record, fmt: str, shapes: tuple[Shape, ...], purpose: str) -> Format:
    """The row's format (named, or detected among those of ``shapes``), with its fields."""
    row, where = record.row, record.where
    allowed = format_names(*shapes)
    name = detect_format(row, where, allowed) if fmt == "auto" else fmt
    if name not in allowed:
        raise DataError(
            f"{where}: format {name!r} cannot be used for {purpose} (expected one of "
            f"{', '.join(allowed)}, or auto); set data.format or the source's format"
        )
    found = next(f for f in FORMATS if f.name == name)
    missing = found.missing(row)
    if missing:
        raise DataError(
            f"{where}: a {name!r} row needs the fields {', '.join(found.fields)}; "
            f"missing {', '.join(missing)} (found {', '.join(row) or 'no fields'})"
        )
    return found


def _has_pair(row: dict[str, Any]) -> bool:
    return row.get("chosen") is not None and row.get("rejected") is not None


def _kto_field(row: dict[str, Any]) -> str | None:
    """The field marking a row desirable or not (KTO data), if the row has one."""
    return next((f for f in KTO_FIELDS if isinstance(row.get(f), bool)), None)


# ------------------------------------------------------------------ canonical examples


def to_sft_example(record: Record, fmt: str = "auto") -> Example:
    """A chat or text example for supervised fine-tuning."""
    found = _checked_format(record, fmt, ("chat", "text"), "supervised fine-tuning")
    _refuse_unpaired(record)
    if found.shape == "text":
        return {"text": found.read(record)}
    example = to_chat(record, found.name)
    _refuse_prompt_only(record, example["messages"])
    return example


def _refuse_unpaired(record: Record) -> None:
    """KTO rows mark some answers undesirable: SFT would train those as good ones."""
    field = _kto_field(record.row)
    if field is None:
        return
    raise DataError(
        f"{record.where}: this row has a boolean {field!r} ({record.row[field]}): an unpaired "
        "preference row (KTO data, desirable and undesirable answers). Supervised fine-tuning "
        f"would train the undesirable answers as good ones: train KTO on them with {KTO_DATA}. "
        f"To fine-tune on the desirable rows only, keep those whose {field} is "
        f"true and drop the field, e.g. `jq -c 'select(.{field} == true) | del(.{field})' "
        f"in.jsonl > sft.jsonl`; if {field!r} means something else here, rename it with a "
        f"source's `columns` mapping (e.g. `columns: {{tag: {field}}}`)"
    )


def _refuse_prompt_only(record: Record, messages: list[Message]) -> None:
    """A preference row whose conversation is only the prompt (LLaMA-Factory's ShareGPT
    ranking rows): SFT would train none of its answers, so it is refused, not dropped."""
    if not _has_pair(record.row) or messages[-1]["role"] == "assistant":
        return  # conversations that end with an answer (e.g. UltraFeedback's) are SFT data
    raise DataError(
        f"{record.where}: this row holds chosen and rejected responses (a preference row) and "
        "its conversation ends before them, so supervised fine-tuning would train nothing of "
        "it: train it with src.datamodules.PreferenceDataModule (configs/dpo.yaml), or, to "
        "fine-tune on the chosen answers, write each as the last turn of its conversation "
        "and drop chosen and rejected"
    )


def to_chat(record: Record, fmt: str = "auto") -> Example:
    """A chat example: checked messages (known roles, text content, not empty) and tools."""
    row, where = record.row, record.where
    found = _checked_format(record, fmt, ("chat",), "chat data")
    messages = check_messages(_plain_messages(found.read(record), where), where)
    return with_tools({"messages": messages}, row, where)


def to_text(record: Record, fmt: str = "auto") -> str:
    """The text of a pretraining row."""
    return _checked_format(record, fmt, ("text",), "pretraining").read(record)


def to_preference(record: Record, fmt: str = "auto") -> Example:
    """Prompt, chosen and rejected message lists of a preference row.

    ``prompt`` may be a string or messages, else the row's ``conversations`` / ``messages``
    (LLaMA-Factory) or alpaca ``instruction``; ``chosen``/``rejected`` strings, messages or
    one message / ShareGPT turn each. Without a prompt, chosen and rejected are whole
    conversations (message lists or hh-rlhf transcripts) whose shared leading messages are
    the prompt.
    """
    row, where = record.row, record.where
    pair = _checked_format(record, fmt, ("preference",), "preference data").read(record)
    prompt = pair["prompt"]
    check_messages(prompt, f"{where} (prompt)")
    for name in ("chosen", "rejected"):
        answer = pair[name]
        check_messages(prompt + answer, f"{where} ({name})")
        if answer[0]["role"] != "assistant":
            raise DataError(
                f"{where}: the {name} response must start with an assistant message, "
                f"found {answer[0]['role']!r}"
            )
    if row.get("margin") is not None:  # a reward model's required score gap (Llama 2)
        pair["margin"] = _margin(row["margin"], where)
    return with_tools(pair, row, where)


def _margin(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: 'margin' must be a finite number, found {value!r}")
    return float(value)


def to_unpaired(record: Record, fmt: str = "auto") -> Example:
    """Prompt and completion messages of an unpaired preference row (KTO), and its label.

    A row of any chat format with a boolean ``label`` (TRL) or ``kto_tag`` (LLaMA-Factory):
    a ``prompt_completion`` row's completion is its ``completion`` (a string or assistant
    message(s)); a conversation's is its final run of assistant messages.
    """
    row, where = record.row, record.where
    found = _checked_format(record, fmt, ("chat",), "unpaired preference data (KTO)")
    field = _kto_field(row)
    if field is None:
        raise DataError(f"{where}: {_no_kto_label(row)}")
    messages = check_messages(_plain_messages(found.read(record), where), where)
    if found.name == "prompt_completion":
        start = len(_turns(row["prompt"], "user", where, "prompt"))
    else:
        start = len(messages)
        while start > 0 and messages[start - 1]["role"] == "assistant":
            start -= 1
    prompt, completion = messages[:start], messages[start:]
    if not prompt or not completion or completion[0]["role"] != "assistant":
        raise DataError(
            f"{where}: an unpaired preference row needs a prompt followed by the assistant "
            "completion to judge; this one has "
            + ("no prompt before it" if completion and not prompt else "no assistant answer last")
        )
    return with_tools({"prompt": prompt, "completion": completion, "label": row[field]}, row, where)


def _no_kto_label(row: dict[str, Any]) -> str:
    found = ", ".join(f"{f}: {row[f]!r}" for f in KTO_FIELDS if f in row) or "no such field"
    text = (
        "an unpaired preference row (KTO) needs a boolean 'label' (TRL) or 'kto_tag' "
        f"(LLaMA-Factory), true for a desirable completion and false for an undesirable one; "
        f"found {found}. Name another column with a source's `columns` mapping (e.g. "
        "`columns: {label: thumbs_up}`)"
    )
    if _has_pair(row):
        text += (
            ". This row is a preference pair (chosen, rejected): train it with "
            "src.datamodules.PreferenceDataModule (configs/dpo.yaml), or write it as two "
            "rows, the chosen completion with label true and the rejected with label false"
        )
    return text


def _after(prompt: list[Message], side: list[Message]) -> list[Message]:
    """A side without the prompt it repeats: UltraFeedback's chosen and rejected are whole
    conversations beside their prompt, and the prompt must not be rendered twice."""
    n = len(prompt)
    if len(side) > n and all(_same_turn(a, b) for a, b in zip(prompt, side[:n], strict=True)):
        return side[n:]
    return side


def _same_turn(a: Any, b: Any) -> bool:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


def _preference_prompt(row: dict[str, Any], where: str) -> list[Message] | None:
    """The prompt a preference row states, or None when chosen/rejected imply it."""
    if row.get("prompt") is not None:
        return _plain_messages(_prompt_turns(row["prompt"], where), where)
    if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
        return None  # whole conversations: a conversation field beside them may repeat them
    if row.get("conversations") is not None:  # LLaMA-Factory's ShareGPT ranking rows
        field, prompt = (
            "conversations",
            _from_sharegpt(row["conversations"], where, row.get("system")),
        )
    elif row.get("messages") is not None:  # the same with OpenAI role/content tags
        field, prompt = "messages", row["messages"]
    elif row.get("instruction") is not None:  # LLaMA-Factory's alpaca ranking rows
        return _alpaca_prompt(row, where)
    else:
        return None
    prompt = _plain_messages(prompt, where)
    if isinstance(prompt, list) and prompt and _role(prompt[-1]) == "assistant":
        raise DataError(
            f"{where}: {field!r} ends with an assistant turn, so it cannot be the prompt that "
            "chosen and rejected answer; end it with the turn they answer"
        )
    return prompt


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _prompt_turns(value: Any, where: str) -> list[Message]:
    """A prompt's messages; an hh-rlhf transcript ending "\\n\\nAssistant:" awaits the
    response, so that empty last turn is not part of it."""
    turns = _turns(value, "user", where, "prompt", transcripts=True)
    last = turns[-1]
    if isinstance(value, str) and last["role"] == "assistant" and not last["content"]:
        turns = turns[:-1]
    return turns


def _split_shared_start(
    chosen: list[Message], rejected: list[Message], where: str
) -> tuple[list[Message], list[Message], list[Message]]:
    """Prompt, chosen and rejected of two whole conversations: their shared leading messages
    are the prompt, and each keeps at least its last message."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(
            f"{where} (prompt): empty conversation: the row has no 'prompt' and chosen and "
            "rejected share no leading turn; give a prompt, or chosen and rejected as whole "
            f"conversations (message lists or {HH_SHAPE} transcripts) that start alike"
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


# ------------------------------------------------------------------ turns and messages


def _turns(
    value: Any, role: str, where: str, field: str, transcripts: bool = False
) -> list[Message]:
    """A string becomes one message of ``role`` (or, with ``transcripts``, the turns of an
    hh-rlhf transcript); one message or ShareGPT turn becomes a list of it; a non-empty list
    of messages or ShareGPT turns is kept."""
    if isinstance(value, str):
        turns = hh_transcript(value) if transcripts else None
        return turns or [{"role": role, "content": value}]
    if _is_turn(value):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        return _from_sharegpt(value, where)
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: {field!r} must be a string or a non-empty list of messages (or one "
            "message or ShareGPT turn object), "
            f"found {type(value).__name__ if value else 'an empty value'}"
        )
    return value


def _response(value: Any, where: str, field: str) -> list[Message]:
    """A chosen or rejected side: text, a transcript, a message, a turn, or messages."""
    return _plain_messages(_turns(value, "assistant", where, field, transcripts=True), where)


def _is_turn(value: Any) -> bool:
    """One message (role with content or tool calls) or one ShareGPT turn (from, value)."""
    if not isinstance(value, dict):
        return False
    if "role" in value:
        return "content" in value or bool(value.get("tool_calls"))
    return "from" in value and "value" in value


def _alpaca_prompt(row: dict[str, Any], where: str) -> list[Message]:
    prompt = str(row["instruction"])
    if row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}"
    messages = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
    return messages + _alpaca_history(row.get("history"), where) + [_user(prompt)]


def _alpaca_history(history: Any, where: str) -> list[Message]:
    """LLaMA-Factory's alpaca ``history``: the earlier rounds, ``[[instruction, response]...]``."""
    if not history:
        return []
    rounds = history if isinstance(history, list) else None
    if rounds is None or not all(isinstance(r, list | tuple) and len(r) == 2 for r in rounds):
        raise DataError(
            f"{where}: 'history' must be a list of [instruction, response] pairs, "
            f"found {kind(history)}"
        )
    return [
        message
        for query, answer in rounds
        for message in (_user(str(query)), {"role": "assistant", "content": str(answer)})
    ]


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _from_sharegpt(turns: Any, where: str, system: Any = None) -> list[Message]:
    """Messages of ShareGPT turns; a row-level ``system`` (LLaMA-Factory) opens them."""
    if not isinstance(turns, list):
        raise DataError(f"{where}: 'conversations' must be a list of turns")
    messages = []
    if isinstance(system, str) and system and not _opens_with_system(turns):
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: turn {i} must be an object with 'from' and 'value'")
        speaker = str(turn["from"]).lower()
        role = SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise DataError(
                f"{where}: turn {i} has unknown speaker {turn['from']!r} "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        if speaker == "function_call":
            messages.append(
                function_call_message(turn["value"], f"{where}: turn {i} (function_call)")
            )
        else:
            messages.append({"role": role, "content": turn["value"]})
    return messages


def _opens_with_system(turns: list[Any]) -> bool:
    first = turns[0] if turns else None
    return isinstance(first, dict) and str(first.get("from", "")).lower() == "system"


def hh_transcript(text: str) -> list[Message] | None:
    """The turns of an hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ..."), or None
    when ``text`` is not one (it must open with a Human turn and hold an Assistant turn)."""
    body = text.lstrip()
    if not body.startswith("Human:") or "\n\nAssistant:" not in body:
        return None
    parts = HH_TURN.split("\n\n" + body)  # ["", speaker, text, speaker, text, ...]
    return [
        {"role": HH_SPEAKERS[speaker], "content": said.strip()}
        for speaker, said in zip(parts[1::2], parts[2::2], strict=True)
    ]


# ------------------------------------------------------------------ content


def _plain_messages(messages: Any, where: str) -> Any:
    """The messages with content given as typed parts turned into text (anything else is
    left for ``check_messages`` to judge)."""
    if not isinstance(messages, list):
        return messages
    return [
        {**m, "content": _parts_text(m["content"], f"{where}: message {i}")}
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        else m
        for i, m in enumerate(messages)
    ]


def _parts_text(parts: list[Any], where: str) -> str:
    """The text of content parts (``{"type": "text", "text"|"value": ...}``), joined by a
    newline as OpenAI-compatible servers (vLLM) join them for a text-only template."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") is None:
            raise DataError(f"{where}: content part {j} must be an object with a 'type'")
        if part["type"] != "text":
            raise DataError(
                f"{where}: content part {j} is of type {part['type']!r}, not text: this project "
                "trains on text only; drop the part (or the row)"
            )
        text = part.get("text") if isinstance(part.get("text"), str) else part.get("value")
        if not isinstance(text, str):
            raise DataError(f"{where}: text part {j} has no string 'text' (or 'value')")
        texts.append(text)
    return "\n".join(texts)


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
