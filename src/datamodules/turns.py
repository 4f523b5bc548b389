"""Where each assistant turn starts and stops in a chat template's rendering.

The policy (DESIGN rule 9): the trained text of an assistant turn is what the model writes
after the generation prompt, up to and including the token it stops on, nothing after it.

- **Start**: where the rendering of the conversation before the turn, with the generation
  prompt, stops. A generation prompt may write what the whole rendering lacks at that place
  (DeepSeek-R1 opens ``<think>\\n``): the turn then starts where the two stop agreeing.
  Where a template rewrites earlier text (Mistral v0.3 moves the system prompt into the last
  user turn), the turn's content is searched for instead.
- **Stop**: the first *closing token* after the turn's content. Closing tokens are the
  tokens generation stops on (``generation_config.eos_token_id``, the EOS, ``stop_token``)
  and the token the template closes an assistant turn with, read from a probe conversation
  (Gemma's ``<end_of_turn>``, Phi's ``<|end|>``, gpt-oss's ``<|end|>`` on earlier turns; where
  a template writes no end-of-turn token, as GLM-4.5, the next role token that closes it).
  What a template writes after that token (Phi-3's ``<|endoftext|>`` after the last turn,
  Command-R7B's open assistant header) is not trained.
- A turn that the template closes with nothing (GLM-4.5's last turn) is ``open``; the
  encoder appends the stop token to a last turn left open.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]
RenderFn = Callable[..., str]

PROBE = [
    {"role": "user", "content": "Probe question one."},
    {"role": "assistant", "content": "Probe answer one."},
    {"role": "user", "content": "Probe question two."},
    {"role": "assistant", "content": "Probe answer two."},
]
PROBE_TOOL = {
    "type": "function",
    "function": {"name": "probe", "description": "A probe.", "parameters": {"type": "object"}},
}


@dataclass(frozen=True)
class Turn:
    """Character span ``[start, end)`` of an assistant turn in the whole rendering."""

    start: int
    end: int
    closer: str | None  # the closing token it ends with; None: the template wrote none
    lead: str = ""  # what the generation prompt writes there that the rendering lacks
    open: bool = False  # nothing at all follows the turn's content: no closer was written


@dataclass(frozen=True)
class TemplateProfile:
    """What closes an assistant turn under a chat template and tokenizer."""

    specials: tuple[str, ...]  # the tokenizer's special tokens, longest first
    atomic: tuple[str, ...]  # every added token, special or not: never split
    stops: tuple[str, ...]  # tokens generation stops on
    closers: tuple[str, ...]  # stops and the template's own end-of-turn tokens
    final: str | None  # what closes a conversation's last turn (generation stops on it)

    def first_closer(self, text: str, lo: int, hi: int) -> tuple[int, str] | None:
        """The earliest closing token starting in ``[lo, hi]``."""
        best: tuple[int, str] | None = None
        for token in self.closers:
            pos = text.find(token, lo, hi + len(token))
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, token)
        return best

    def token_start(self, text: str, pos: int) -> int:
        """``pos``, or the start of the added token that ``pos`` falls inside."""
        for token in self.atomic:
            at = text.rfind(token, max(0, pos - len(token) + 1), pos + len(token) - 1)
            if 0 <= at < pos < at + len(token):
                return at
        return pos


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    found = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    found |= {t for t in tokenizer.all_special_tokens if t}
    return tuple(sorted(found, key=len, reverse=True))


def generation_stop_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The tokens of ``generation_config.json``'s ``eos_token_id`` beside the tokenizer."""
    ids = _generation_eos_ids(str(tokenizer.name_or_path))
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in ids if 0 <= i < len(tokenizer)]
    return tuple(t for t in tokens if t)


def _generation_eos_ids(name_or_path: str) -> tuple[int, ...]:
    if not name_or_path:
        return ()
    directory = Path(name_or_path).expanduser()
    path = directory / "generation_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
    elif directory.exists():
        return ()
    else:
        config = _hub_generation_config(name_or_path)
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


@cache
def _hub_generation_config(repo_id: str) -> dict[str, Any]:
    try:  # from the hub, or its local cache when offline
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(repo_id).to_dict()
    except (OSError, ValueError):
        return {}


def profile(
    render: RenderFn, tokenizer: PreTrainedTokenizerBase, stop_tokens: tuple[str, ...] = ()
) -> TemplateProfile:
    """Read the template's closing tokens from probe conversations (with and without tools)."""
    specials = special_tokens(tokenizer)
    stops = tuple(dict.fromkeys(t for t in (*stop_tokens, tokenizer.eos_token) if t))
    closers, finals = list(stops), []
    for tools in (None, [PROBE_TOOL]):
        try:
            text = render(PROBE, tools=tools)
        except (jinja2.TemplateError, ValueError, TypeError):
            continue
        one = text.find("Probe answer one.")
        two = text.find("Probe question two.", max(one, 0))
        last = text.rfind("Probe answer two.")
        if min(one, two, last) < 0:
            continue
        one += len("Probe answer one.")
        gap = text[one:two]
        found = _first_of(stops, gap) or _first_of(specials, gap)
        if found and found not in closers:
            closers.append(found)
        tail = text[last + len("Probe answer two.") :]
        final = _first_of(tuple(closers), tail)
        if final:
            finals.append(final)
    final = finals[0] if finals else (stops[0] if stops else None)
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    atomic = tuple(sorted(added, key=len, reverse=True))
    return TemplateProfile(specials, atomic, stops, tuple(closers), final)


def _first_of(tokens: tuple[str, ...], text: str) -> str | None:
    hits = [(text.find(t), t) for t in tokens if t in text]
    return min(hits)[1] if hits else None


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _try_render(render: RenderFn, messages: list[Message], **kwargs: Any) -> str | None:
    """A prefix rendering, or None where the template refuses a partial conversation."""
    if not messages:
        return None
    try:
        return render(messages, **kwargs)
    except jinja2.TemplateError:
        return None


def content_text(message: Message) -> str:
    """The message's text as templates usually write it: trimmed, reasoning split off."""
    content = message.get("content") or ""
    if isinstance(content, list):  # content parts: their text
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        return ""
    return content.split("</think>")[-1].strip()


def tool_names(message: Message) -> list[str]:
    """The names of the functions a message calls."""
    names = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


def anchors(message: Message) -> list[str]:
    """Text the rendering of an assistant turn holds near its end: its last tool call's
    name (templates write calls after the text), then its content."""
    return [a for a in (*reversed(tool_names(message)), content_text(message)) if a]


class TurnFinder:
    """The assistant turns of one conversation in its whole rendering ``text``."""

    def __init__(
        self,
        render: RenderFn,
        prof: TemplateProfile,
        messages: list[Message],
        text: str,
        tools: Any = None,
    ) -> None:
        self.render, self.prof, self.messages, self.text = render, prof, messages, text
        self.tools = tools
        self._through: dict[int, int | None] = {}

    def turns(self) -> list[Turn]:
        """Every assistant turn, in order. Raises ``ValueError`` when one cannot be located."""
        out: list[Turn] = []
        cursor = 0
        for i, message in enumerate(self.messages):
            if message["role"] != "assistant":
                continue
            start, lead = self._start(i, cursor)
            turn = self._stop(i, start, lead)
            out.append(turn)
            cursor = turn.end
        return out

    def _render(self, messages: list[Message], gen: bool = False) -> str | None:
        return _try_render(self.render, messages, add_generation_prompt=gen, tools=self.tools)

    def _start(self, i: int, cursor: int) -> tuple[int, str]:
        text = self.text
        prefix = self._render(self.messages[:i], gen=True)
        if prefix is None:
            return self._search_start(i, cursor, None), ""
        shared = common_prefix(prefix, text)
        if shared == len(prefix) and shared >= cursor:
            return shared, ""
        base = self._render(self.messages[:i])
        if (
            base is not None
            and prefix.startswith(base)
            and text.startswith(base)
            and shared > max(len(base), cursor)
        ):  # the generation prompt opens what the whole rendering lacks (R1's <think>):
            # the turn starts where they part, never inside a token of either
            start = min(self.prof.token_start(text, shared), self.prof.token_start(prefix, shared))
            return start, prefix[start:]
        return self._search_start(i, cursor, prefix), ""

    def _search_start(self, i: int, cursor: int, prefix: str | None) -> int:
        """Where the turn starts when the prompt renders differently in the whole (Mistral
        v0.3 moves the system prompt into the last user turn; gpt-oss drops a tool call's
        analysis once a final answer follows): after the previous message's text and what
        the generation prompt writes after it, else before the turn's content."""
        text, message = self.text, self.messages[i]
        limit = self._through_end(i) or len(text)
        content = content_text(message)
        pos = text.rfind(content, cursor, limit) if content and limit > cursor else -1
        if pos < 0 and content:
            pos = text.find(content, cursor)
        if pos < 0:  # a tool call turn: before the last place of its first call's name
            names = [text.rfind(n, cursor, limit) for n in tool_names(message)[:1]]
            pos = min((p for p in names if p >= 0), default=-1)
        after_previous = self._after_previous(i, cursor, prefix, pos if pos >= 0 else limit)
        if after_previous is not None:
            return after_previous
        if pos >= 0 and content and text.startswith(content, pos):
            return max(cursor, len(text[:pos].rstrip(" ")))  # "[/INST] 42": " " is written
        raise ValueError(f"assistant message {i} is not in the chat template's rendering")

    def _after_previous(self, i: int, cursor: int, prefix: str | None, hi: int) -> int | None:
        """The end of the generation prompt in the whole: the previous message's text, then
        what the generation prompt writes after it (``[/INST]``, ``<|start|>assistant``)."""
        if prefix is None:
            return None
        previous = next(
            (content_text(m) for m in reversed(self.messages[:i]) if content_text(m)), ""
        )
        if not previous or previous not in prefix:
            return None
        tail = prefix[prefix.rfind(previous) + len(previous) :]
        at = self.text.rfind(previous, cursor, hi)
        if not tail.strip() or at < 0 or not self.text.startswith(tail, at + len(previous)):
            return None
        return at + len(previous) + len(tail)

    def _through_end(self, i: int) -> int | None:
        """Where the rendering of the conversation through turn ``i`` stops in the whole,
        less what a template writes only to close a conversation (Phi-3's EOS, an open
        header): None when the two renderings differ in the turn's own text."""
        if i not in self._through:
            self._through[i] = self._find_through_end(i)
        return self._through[i]

    def _find_through_end(self, i: int) -> int | None:
        through = self._render(self.messages[: i + 1])
        if through is None:
            return None
        shared = self.prof.token_start(self.text, common_prefix(through, self.text))
        rest = through[shared:]
        for token in self.prof.specials:
            rest = rest.replace(token, "")
        return shared if not rest.strip() else None

    def _bound(self, i: int, start: int) -> int:
        """A place the turn cannot reach past: where the rendering through it stops, else
        where the next message's content (or its rendering's agreement with the whole)
        stops."""
        text = self.text
        through = self._through_end(i)
        if through is not None and through > start:
            return through
        bounds = [len(text)]
        if i + 1 < len(self.messages):
            content = content_text(self.messages[i + 1])
            nxt = self._render(self.messages[: i + 2])
            limit = common_prefix(nxt, text) if nxt is not None else len(text)
            pos = text.rfind(content, start, limit) if content else -1
            if pos < 0 and content:
                pos = text.find(content, start)
            # the next content, else where the rendering through it stops agreeing (a
            # template that writes content parts as "")
            bounds.append(pos if pos > start else limit if limit > start else len(text))
        return min(bounds)

    def _stop(self, i: int, start: int, lead: str) -> Turn:
        """Through the first closing token after the turn's last anchor (its last tool call,
        else its content) that has one before ``bound``: an anchor's text may recur in the
        next header (an answer ``a`` in ``<|im_start|>``)."""
        text, message = self.text, self.messages[i]
        bound = self._bound(i, start)
        seen = False  # an anchor is in the turn (else the template dropped them all)
        for anchor in anchors(message):
            hi = bound
            while (pos := text.rfind(anchor, start, hi)) >= 0:
                seen = True
                found = self.prof.first_closer(text, pos + len(anchor), bound)
                if found is not None:
                    return Turn(start, found[0] + len(found[1]), found[1], lead)
                hi = pos + len(anchor) - 1
        found = self.prof.first_closer(text, start, bound)
        if found is not None and not seen:
            return Turn(start, found[0] + len(found[1]), found[1], lead)
        end = max(start, len(text[:bound].rstrip()))
        after = _anchor_end(text, anchors(message), start, end)
        is_open = not text[after:end].strip() or bool(tool_names(message))
        return Turn(start, end, None, lead, open=is_open)


def _anchor_end(text: str, found: list[str], lo: int, hi: int) -> int:
    for anchor in found:
        pos = text.rfind(anchor, lo, hi)
        if pos >= 0:
            return pos + len(anchor)
    return lo
