"""Check a chat template before training on it: probe conversations and their trained text.

    python -m src.preview --check-template --config configs/sft.yaml
    python -m src.preview --check-template --tokenizer path/to/model

Each probe (one turn, a system prompt, three turns, reasoning on two turns, a tool call and
its result) is rendered through the template; every assistant turn's trained text is
printed with its stop token between ``⟦`` and ``⟧``, then a verdict per behaviour: the last
turn ends with a token generation stops on, every turn ends with its closing token and
nothing after it, no header or prompt is trained, nothing of the conversation is dropped,
and the ids are those of ``apply_chat_template(tokenize=True)``. Exit status 1 when a probe
fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TextIO

import jinja2

from src.datamodules.chat import ChatEncoder, Rendered, encode_with_offsets

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {
    "id": "call12345",  # Mistral's templates want ids of 9 letters and digits
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}


def _chat(*turns: str, system: str | None = None) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    return messages + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


PROBES: dict[str, dict[str, Any]] = {
    "single turn": {"messages": _chat("What is 2 + 2?", "4")},
    "system prompt": {
        "messages": _chat("Capital of France?", "Paris", system="Answer in one word.")
    },
    "three turns": {
        "messages": _chat("Say red.", "red", "Say green.", "green", "Say blue.", "blue")
    },
    "reasoning on two turns": {
        "messages": [
            {"role": "user", "content": "Reverse the words: red fox."},
            {"role": "assistant", "content": "fox red", "reasoning_content": "swap the words"},
            {"role": "user", "content": "Now uppercase it."},
            {"role": "assistant", "content": "FOX RED", "reasoning_content": "upper case"},
        ]
    },
    "tool call and result": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {
                "role": "tool",
                "tool_call_id": "call12345",
                "content": '{"sky": "clear", "celsius": 21}',
            },
            {"role": "assistant", "content": "Clear, 21 degrees."},
        ],
        "tools": TOOLS,
    },
}
REQUIRED = ("single turn", "three turns")  # a template that rejects these cannot be trained


@dataclass
class Verdict:
    ok: bool
    text: str
    note: bool = False  # reported, never a failure


def check_template(encoder: ChatEncoder, out: TextIO) -> bool:
    """Print every probe's trained text and verdicts; True when none fails."""
    prof = encoder.profile
    name = encoder.tokenizer.name_or_path or "the tokenizer"
    print(f"chat template check: {name}", file=out)
    print(f"  generation stops on: {', '.join(prof.stops) or 'nothing known'}", file=out)
    print(f"  turns close with: {', '.join(prof.closers) or 'nothing found'}", file=out)
    failed = []
    for probe, example in PROBES.items():
        print(f"\nprobe: {probe}", file=out)
        if "tools" in example and not _supports_tools(encoder):
            print(
                "  note the template has no tool support (it never reads tool_calls): "
                "rows with tool calls are counted in the data summary as losing them",
                file=out,
            )
            continue
        verdicts = _probe(encoder, example, out)
        if verdicts is None:
            if probe in REQUIRED:
                failed.append(probe)
            continue
        for v in verdicts:
            mark = "note" if v.note else ("ok  " if v.ok else "FAIL")
            print(f"  {mark} {v.text}", file=out)
        if not all(v.ok or v.note for v in verdicts):
            failed.append(probe)
    if failed:
        print(f"\n{len(failed)} probe(s) failed: {', '.join(failed)}", file=out)
    else:
        print("\nall probes pass", file=out)
    return not failed


def with_string_arguments(example: dict[str, Any]) -> dict[str, Any]:
    """The example with every tool call's arguments as a JSON string."""
    messages = []
    for m in example["messages"]:
        calls = [
            {
                **c,
                "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])},
            }
            for c in m.get("tool_calls") or []
        ]
        messages.append({**m, "tool_calls": calls} if calls else m)
    return {**example, "messages": messages}


def _supports_tools(encoder: ChatEncoder) -> bool:
    return "tool_calls" in encoder.renderer.template(TOOLS)


def _probe(encoder: ChatEncoder, example: dict[str, Any], out: TextIO) -> list[Verdict] | None:
    try:
        rendered = encoder.render_example(example)
    except (jinja2.TemplateError, ValueError) as err:
        if "tools" in example and example is PROBES["tool call and result"]:
            # DeepSeek's templates join the arguments as a string: give them one
            print(f"  with arguments as an object the template rejects it: {err}", file=out)
            print("  again with arguments as a JSON string:", file=out)
            return _probe(encoder, with_string_arguments(example), out)
        print(f"  the template rejects it: {err}", file=out)
        return None
    tokenizer = encoder.tokenizer
    ids, offsets = encode_with_offsets(tokenizer, [rendered.text])[0]
    prof = encoder.profile
    verdicts: list[Verdict] = []
    texts = []
    for k, turn in enumerate(rendered.turns):
        picked = [i for i, (s, _) in zip(ids, offsets, strict=True) if turn.start <= s < turn.end]
        trained = tokenizer.decode(picked, skip_special_tokens=False)
        closer = turn.closer
        if k == len(rendered.turns) - 1 and rendered.appended:
            trained, closer = trained + rendered.appended, rendered.appended
        texts.append(trained)
        shown = trained[: len(trained) - len(closer)] + f"⟦{closer}⟧" if closer else trained
        print(f"  turn {k + 1} trained: {shown!r}", file=out)
        verdicts.append(_closing_verdict(k, len(rendered.turns), closer, trained, prof.stops))
    verdicts.append(_header_verdict(encoder, example, rendered, texts))
    verdicts.extend(_dropped_verdicts(rendered, encoder.reasoning))
    verdicts.append(_ids_verdict(encoder, example, rendered))
    return verdicts


def _closing_verdict(
    k: int, n: int, closer: str | None, trained: str, stops: tuple[str, ...]
) -> Verdict:
    turn = f"turn {k + 1}"
    if closer is None:
        return Verdict(False, f"{turn}: no end-of-turn token: the model would never stop")
    if not trained.endswith(closer):
        return Verdict(False, f"{turn}: text trained after its stop token {closer}")
    if k == n - 1 and closer not in stops:
        return Verdict(
            False,
            f"{turn}: ends with {closer}, which generation does not stop on "
            "(add it to generation_config.json's eos_token_id or set data.stop_token)",
        )
    return Verdict(True, f"{turn}: ends with {closer}, nothing trained after it")


def _header_verdict(
    encoder: ChatEncoder, example: dict[str, Any], rendered: Rendered, texts: list[str]
) -> Verdict:
    messages = example["messages"]
    prompts = [m["content"] for m in messages if m["role"] != "assistant" and m["content"]]
    leaked = [p for p in prompts if any(p in t for t in texts)]
    if leaked:
        return Verdict(False, f"prompt text trained: {leaked[0]!r}")
    header = _generation_prompt(encoder, example)
    for token in _user_header_tokens(encoder, rendered.text, prompts):
        for text in texts:
            # a header token inside a turn is a leak, unless it opens another assistant
            # message of the same turn (gpt-oss: analysis, then final)
            rest = text.replace(header, "") if header and token in header else text
            closer_free = rest[: len(rest) - len(token)] if rest.endswith(token) else rest
            if token in closer_free:
                return Verdict(False, f"a header is trained: {token} inside {text!r}")
    return Verdict(True, "no header or prompt trained")


def _generation_prompt(encoder: ChatEncoder, example: dict[str, Any]) -> str:
    """What ``add_generation_prompt`` adds before the first assistant turn."""
    messages, tools = example["messages"], example.get("tools")
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    with_prompt = encoder.renderer(messages[:first], add_generation_prompt=True, tools=tools)
    without = encoder.renderer(messages[:first], tools=tools)
    return with_prompt[len(without) :] if with_prompt.startswith(without) else ""


def _user_header_tokens(encoder: ChatEncoder, text: str, prompts: list[str]) -> set[str]:
    """The special token that opens the header of a prompt message: the first one after the
    previous closing token (``<|im_start|>``, ``<|start|>``, ``<|START_OF_TURN_TOKEN|>``)."""
    prof, found = encoder.profile, set()
    bos = encoder.tokenizer.bos_token
    for prompt in prompts:
        pos = text.find(prompt)
        if pos < 0:
            continue
        seg = max(
            (text.rfind(c, 0, pos) + len(c) for c in prof.closers if c in text[:pos]), default=0
        )
        hits = [(text.find(t, seg, pos), t) for t in prof.specials if t != bos]
        hits = [(at, t) for at, t in hits if at >= 0]
        if hits:
            found.add(min(hits)[1])
    return found


def _dropped_verdicts(rendered: Rendered, reasoning: str) -> list[Verdict]:
    verdicts = []
    for part in rendered.dropped:
        if part == "reasoning":
            verdicts.append(
                Verdict(
                    True, f"the template drops reasoning here (data.reasoning: {reasoning})", True
                )
            )
        else:
            verdicts.append(Verdict(False, f"the template drops the {part}"))
    if not any(not v.note for v in verdicts):
        verdicts.insert(0, Verdict(True, "nothing of the conversation dropped"))
    return verdicts


def _ids_verdict(encoder: ChatEncoder, example: dict[str, Any], rendered: Rendered) -> Verdict:
    tokenizer = encoder.tokenizer
    expected = tokenizer.apply_chat_template(
        example["messages"], tools=example.get("tools"), tokenize=True, return_dict=False
    )
    if isinstance(expected, dict) or hasattr(expected, "keys"):
        expected = expected["input_ids"]
    got = encoder.encode([example], ["probe"])[0]
    ids = list(got.input_ids)
    extras = []
    if encoder.needs_bos(rendered.text):
        ids, extras = ids[1:], [*extras, "a BOS in front"]
    if got.appended:
        ids, extras = ids[:-1], [*extras, f"{got.appended} appended"]
    if ids == list(expected):
        more = f" (besides {' and '.join(extras)})" if extras else ""
        return Verdict(True, f"same ids as apply_chat_template(tokenize=True){more}")
    if encoder.reasoning in ("keep_all", "keep_last"):
        return Verdict(
            True,
            f"ids differ by the reasoning put back (data.reasoning: {encoder.reasoning})",
            True,
        )
    return Verdict(False, "ids differ from apply_chat_template(tokenize=True)")
