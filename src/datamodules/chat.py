"""Chat rendering and label masks from the model's own chat template, for any template.

The template is treated as a black box: ``turns.py`` finds where each assistant turn starts
(where the generation prompt stops) and stops (through the token generation stops on), by
comparing renderings of the conversation's prefixes with the whole. Tokens are labelled by
their character offsets in the whole rendering, so the ids are exactly those inference
sees: ``apply_chat_template(tokenize=True)``, with a BOS in front where the tokenizer adds
one and the template writes none, and a stop token after a last turn that the template
closes with nothing (GLM-4.5). What the template drops from a conversation (a system
prompt, tool calls, reasoning) is counted per example.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import jinja2
from transformers import PreTrainedTokenizerBase

from src.compat import alias_reasoning_fields, compile_chat_template
from src.datamodules.reasoning import (
    Frame,
    Reasoning,
    learn_frame,
    messages_for,
    reasoning_of,
    splice,
)
from src.datamodules.records import DataError
from src.datamodules.turns import (
    TemplateProfile,
    Turn,
    TurnFinder,
    content_text,
    generation_stop_tokens,
    profile,
    tool_names,
)

IGNORE_INDEX = -100
Message = dict[str, Any]
TrainOn = Literal["assistant", "last_assistant", "all"]


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    dropped: tuple[str, ...] = ()  # what the chat template left out of the conversation
    unstopped: int = 0  # assistant turns trained without a token generation stops on
    appended: str | None = None  # the stop token put after a last turn left open
    empty_turns: int = 0  # assistant turns with nothing to say, not trained


@dataclass
class Rendered:
    """An example's text, the character spans to train, and what the template did to it."""

    text: str
    spans: list[tuple[int, int]]
    appended: str | None = None  # a stop token to put after the text (and train)
    dropped: tuple[str, ...] = ()
    unstopped: int = 0
    turns: list[Turn] = field(default_factory=list)
    empty_turns: int = 0


@dataclass
class Response:
    """A response in the rendering of prompt + response: the text before it, its text, and
    the spans of it to train."""

    prompt: str
    text: str
    spans: list[tuple[int, int]]
    rendered: Rendered


class ChatRenderer:
    """Renders conversations with the tokenizer's chat template.

    The compiled template is called directly (what ``apply_chat_template`` does after its
    argument checks), which is several times faster on short conversations.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.chat_template:
            raise DataError(
                f"the tokenizer {tokenizer.name_or_path!r} has no chat template: set "
                "data.chat_template to a built-in name (chatml, llama-3, mistral, alpaca, "
                "plain) or a Jinja file"
            )
        self.tokenizer = tokenizer
        self.context = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self._compiled: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # compiled templates do not pickle
        return {**self.__dict__, "_compiled": {}}

    def template(self, tools: list[dict] | None = None) -> str:
        """The template's text; of a set of named templates, the one transformers picks
        (``tool_use`` when tools are given, else ``default``)."""
        return self.tokenizer.get_chat_template(tools=tools)

    def __call__(
        self,
        messages: list[Message],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
    ) -> str:
        template = self.template(tools)
        if template not in self._compiled:
            self._compiled[template] = compile_chat_template(template)
        compiled = self._compiled[template]
        try:
            if compiled is None:
                return self.tokenizer.apply_chat_template(
                    messages,
                    tools=tools,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                )
            return compiled.render(
                messages=_template_messages(messages),
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.context,
            )
        except TypeError as err:  # the template combines fields of the wrong type
            raise jinja2.TemplateError(f"{type(err).__name__}: {err}") from err


def _template_messages(messages: list[Message]) -> list[Message]:
    """The messages as ``apply_chat_template`` hands them to the template: without the keys
    whose value is None (Parquet rows carry ``tool_calls: None`` on every message) and, where
    transformers does so, with reasoning under other names copied to ``reasoning_content``."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return alias_reasoning_fields(messages)


@contextmanager
def row_errors(where: str) -> Iterator[None]:
    """A template that rejects a row (``raise_exception``, a missing field) or a turn that
    cannot be located, reported as a ``DataError`` naming the row."""
    try:
        yield
    except DataError:
        raise
    except jinja2.TemplateError as err:
        raise DataError(f"{where}: the chat template rejects this conversation: {err}") from None
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None


def clear_padding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Switch off the padding and truncation kept on a fast tokenizer's backend.

    A call with ``padding=True`` (batched generation) leaves them switched on in the Rust
    tokenizer, ``save_pretrained`` writes them into ``tokenizer.json`` and a tokenizer loaded
    from there pads every batch it encodes: examples encoded straight through the backend
    would then hold pad tokens inside their ``input_ids``. Returns ``tokenizer``.
    """
    if tokenizer.is_fast:
        backend = tokenizer.backend_tokenizer
        if backend.padding is not None:
            backend.no_padding()
        if backend.truncation is not None:
            backend.no_truncation()
    return tokenizer


def encode_with_offsets(
    tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, without special tokens added (nor
    padding or truncation, whatever the tokenizer was left with)."""
    if tokenizer.is_fast:  # straight to the Rust tokenizer: batched, no Python conversion
        clear_padding(tokenizer)
        encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, e.offsets) for e in encodings]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, padding or truncation."""
    if tokenizer.is_fast:
        clear_padding(tokenizer)
        encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def labels_for_spans(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """-100 everywhere except the tokens that start inside one of ``spans``."""
    labels = [IGNORE_INDEX] * len(ids)
    starts = [s for s, _ in offsets]
    for span_start, span_end in spans:
        lo, hi = bisect_left(starts, span_start), bisect_left(starts, span_end)
        labels[lo:hi] = ids[lo:hi]
    return labels


def bos_to_add(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id when the tokenizer adds one by default (templates may write it themselves)."""
    bos_id = tokenizer.bos_token_id
    if tokenizer.bos_token is None or bos_id is None:
        return None
    return bos_id if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos_id] else None


class ChatEncoder:
    """Token ids and labels of chat and text examples, in batches.

    Args:
        tokenizer: Tokenizer whose chat template renders the conversations.
        train_on: ``assistant`` (every assistant turn), ``last_assistant`` or ``all`` tokens.
        stop_tokens: Tokens generation stops on, besides the EOS and those of the
            ``generation_config.json`` beside the tokenizer; the first is the one put after
            a last turn that the template closes with nothing.
        reasoning: What is trained of the turns' reasoning (see ``reasoning.py``).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train_on: TrainOn = "assistant",
        stop_tokens: list[str] | tuple[str, ...] | None = None,
        reasoning: Reasoning = "template",
    ):
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.stop_tokens = tuple(stop_tokens or ())
        self.reasoning = reasoning
        self.bos_id = bos_to_add(tokenizer)
        self.bos_token = tokenizer.bos_token
        self.eos_token = tokenizer.eos_token
        self._renderer: ChatRenderer | None = None

    @property
    def renderer(self) -> ChatRenderer:
        if self._renderer is None:
            self._renderer = ChatRenderer(self.tokenizer)
        return self._renderer

    @cached_property
    def profile(self) -> TemplateProfile:
        stops = (*self.stop_tokens, *generation_stop_tokens(self.tokenizer))
        return profile(self.renderer, self.tokenizer, stops)

    def needs_bos(self, text: str) -> bool:
        return self.bos_id is not None and not text.startswith(self.bos_token)

    def render_example(self, example: dict[str, Any]) -> Rendered:
        """The text of an example, the character spans to train on, and notes."""
        if "text" in example:
            text = example["text"] + (self.eos_token or "")
            return Rendered(text, [(0, len(text))])
        tools = example.get("tools")
        messages = messages_for(example["messages"], self.reasoning)
        text = self.renderer(messages, tools=tools)
        turns = TurnFinder(self.renderer, self.profile, messages, text, tools).turns()
        text, turns = splice(text, turns, messages, self.reasoning, self.frame)
        append = None
        if turns and turns[-1].open and turns[-1].end == len(text.rstrip()):
            append = self.profile.final  # a last turn the template leaves open (GLM-4.5)
        unstopped = max(0, sum(t.closer is None for t in turns) - (append is not None))
        dropped = dropped_parts(messages, text, turns)
        # an assistant turn with nothing to say would teach the model to stop at once
        assistants = [m for m in messages if m["role"] == "assistant"]
        empty = [_is_empty(m) for m in assistants]
        last_empty = bool(empty) and empty[-1]
        if self.train_on == "all":
            spans = [(0, len(text))]
        else:
            spans = [(t.start, t.end) for t, e in zip(turns, empty, strict=True) if not e]
            if self.train_on == "last_assistant":
                spans = [] if last_empty else spans[-1:]
            if last_empty:
                append = None
        return Rendered(text, spans, append, dropped, unstopped, turns, sum(empty))

    def split_response(
        self, prompt: list[Message], response: list[Message], tools: Any = None
    ) -> Response:
        """The text of ``prompt`` and of the ``response`` that follows it in the rendering
        of both, with the spans of the response to train (its assistant turns through their
        stop token, as in SFT labels; not the tool results between them)."""
        rendered = self.render_example({"messages": [*prompt, *response], "tools": tools})
        first = sum(m["role"] == "assistant" for m in prompt)
        turns = rendered.turns[first:]
        if not turns:
            raise ValueError("the response holds no assistant message")
        start, end = turns[0].start, turns[-1].end
        text = rendered.text[start:end] + (rendered.appended or "")
        spans = [(t.start - start, t.end - start) for t in turns]
        if rendered.appended:
            spans[-1] = (spans[-1][0], len(text))
        return Response(rendered.text[:start], text, spans, rendered)

    @cached_property
    def frame(self) -> Frame:
        return learn_frame(self.renderer)

    def encode(self, examples: list[dict[str, Any]], wheres: list[str]) -> list[Tokenized]:
        """Each example rendered, tokenized once, and labelled by character offsets."""
        rendered = []
        for example, where in zip(examples, wheres, strict=True):
            with row_errors(where):
                rendered.append(self.render_example(example))
        out = []
        encodings = encode_with_offsets(self.tokenizer, [r.text for r in rendered])
        for r, (ids, offsets) in zip(rendered, encodings, strict=True):
            ids = list(ids)
            labels = labels_for_spans(ids, offsets, r.spans)
            if self.needs_bos(r.text):  # never two BOS: only when the template wrote none
                ids, labels = [self.bos_id, *ids], [IGNORE_INDEX, *labels]
            if r.appended is not None:
                stop_id = self.tokenizer.convert_tokens_to_ids(r.appended)
                ids, labels = [*ids, stop_id], [*labels, stop_id]
            out.append(Tokenized(ids, labels, r.dropped, r.unstopped, r.appended, r.empty_turns))
        return out

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Pretraining documents: BOS (if the tokenizer uses one), the text, EOS."""
        prefix = [self.bos_id] if self.bos_id is not None else []
        suffix = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return [prefix + list(ids) + suffix for ids in encode_texts(self.tokenizer, texts)]


MODE_FLAGS = ("/no_think", "/nothink", "/think")  # read and removed by SmolLM3, GLM, Qwen3


def _without_mode_flags(text: str) -> str:
    """A system prompt as templates that read reasoning switches from it still write it."""
    for flag in MODE_FLAGS:
        text = text.replace(flag, "")
    return max((line.strip() for line in text.splitlines()), key=len, default="")


def _is_empty(message: Message) -> bool:
    """An assistant message with no content, no tool call and no reasoning."""
    return not (content_text(message) or message.get("tool_calls") or reasoning_of(message))


def generation_stop_ids(
    tokenizer: PreTrainedTokenizerBase, stop_tokens: tuple[str, ...] = ()
) -> list[int]:
    """Ids generation stops on: the stop tokens, the EOS, ``generation_config.json``'s, and
    what the chat template closes a last turn with (Phi-3's ``<|end|>``)."""
    if not tokenizer.chat_template:
        tokens: tuple[str | None, ...] = (*stop_tokens, tokenizer.eos_token)
    else:
        prof = ChatEncoder(tokenizer, stop_tokens=stop_tokens).profile
        tokens = (*prof.stops, prof.final)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in dict.fromkeys(tokens) if t]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def dropped_parts(messages: list[Message], text: str, turns: list[Turn]) -> tuple[str, ...]:
    """What the rendering ``text`` lacks of the conversation: its system prompt, or an
    assistant turn's tool calls, content or reasoning."""
    dropped = []
    if messages and messages[0]["role"] == "system":
        system = _without_mode_flags(content_text(messages[0]))
        if system and system not in text:
            dropped.append("system prompt")
    assistants = [m for m in messages if m["role"] == "assistant"]
    for message, turn in zip(assistants, turns, strict=False):
        span = text[turn.start : turn.end]
        if any(name not in span for name in tool_names(message)):
            dropped.append("tool calls")
        content = content_text(message)
        if content and content not in span:
            dropped.append("assistant content")
        reasoning = reasoning_of(message)
        if reasoning and reasoning not in span:
            dropped.append("reasoning")
    return tuple(dict.fromkeys(dropped))


def missing_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    """The BOS id to put before ``text`` when the tokenizer expects one and the text lacks it."""
    bos = bos_to_add(tokenizer)
    return None if bos is None or text.startswith(tokenizer.bos_token) else bos


def prompt_texts(tokenizer: PreTrainedTokenizerBase, prompts: list[list[Message]]) -> list[str]:
    """Each prompt rendered by the chat template with the generation prompt, and the BOS the
    training rows get where the template writes none (see ``ChatEncoder.encode``)."""
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return [t if missing_bos(tokenizer, t) is None else tokenizer.bos_token + t for t in texts]


def prompt_messages(messages: list[Message]) -> list[Message]:
    """The conversation up to (not including) its last assistant turn: a generation prompt."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return list(messages if last is None else messages[:last])


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    train_on: TrainOn = "assistant",
    tools: list[dict] | None = None,
    **kwargs: Any,
) -> Tokenized:
    """Ids and labels of one conversation (``ChatEncoder`` for batches)."""
    example = {"messages": messages, "tools": tools}
    return ChatEncoder(tokenizer, train_on, **kwargs).encode([example], ["conversation"])[0]
