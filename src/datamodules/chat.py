"""Chat rendering and label masks from the model's own chat template, for any template.

The template is treated as a black box: the character span of assistant turn ``i`` starts
where the rendering of ``messages[:i]`` with the generation prompt stops, and ends where the
rendering of ``messages[:i + 1]`` stops (trailing white space excluded). That span holds the
turn's end-of-turn token, so the model learns to stop, and it works for templates that add
text the messages do not contain (default system prompts, date lines) and for templates
without ``{% generation %}`` markers. Where a template rewrites earlier turns, so that a
prefix rendering is not a prefix of the whole, the content is found by search instead.
Tokens are labelled by their character offsets in the whole rendering, so the ids are
exactly those inference sees.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
from transformers import PreTrainedTokenizerBase

from src.datamodules.records import DataError

IGNORE_INDEX = -100
Message = dict[str, Any]
TrainOn = Literal["assistant", "last_assistant", "all"]


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


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
        self.template = tokenizer.chat_template
        self.context = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self._compiled: Any = None

    def __getstate__(self) -> dict[str, Any]:  # compiled templates do not pickle
        return {**self.__dict__, "_compiled": None}

    def __call__(
        self,
        messages: list[Message],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
    ) -> str:
        if self._compiled is None:
            self._compiled = _compile(self.template)
        if self._compiled is False:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return self._compiled.render(
            messages=_template_messages(messages),
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.context,
        )


def _template_messages(messages: list[Message]) -> list[Message]:
    """The messages as ``apply_chat_template`` hands them to the template: without the keys
    whose value is None (Parquet rows carry ``tool_calls: None`` on every message) and, where
    transformers does so, with reasoning under other names copied to ``reasoning_content``."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return _alias_reasoning_fields(messages)


try:  # transformers' own renaming, where it has one
    from transformers.utils.chat_template_utils import _alias_reasoning_fields
except ImportError:  # pragma: no cover - older transformers

    def _alias_reasoning_fields(messages: list[Message]) -> list[Message]:
        return messages


def _compile(template: str) -> Any:
    try:  # transformers' sandboxed environment, with its helpers (raise_exception, tojson, ...)
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return False
    return _compile_jinja_template(template)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], **kwargs: Any) -> str:
    """The conversation as text, through the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


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


def _try_render(render_fn: Any, messages: list[Message], **kwargs: Any) -> str | None:
    """A prefix rendering, or None where the template refuses a partial conversation."""
    try:
        return render_fn(messages, **kwargs)
    except jinja2.TemplateError:
        return None


def assistant_spans(
    render_fn: Any, messages: list[Message], text: str, eos_token: str | None, tools: Any = None
) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the whole rendering) to train on: the assistant turns.

    Raises ``ValueError`` when an assistant turn cannot be located in the rendering.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        content = (msg.get("content") or "").strip()  # templates often trim it
        prefix = _try_render(render_fn, messages[:i], add_generation_prompt=True, tools=tools)
        start = _prefix_end(text, prefix) if prefix is not None else None
        through = _try_render(render_fn, messages[: i + 1], tools=tools)
        end = _closed_turn_end(text, through, eos_token) if through is not None else None
        if start is None or start < cursor:
            # the last place of the content before the turn's end, not an echo of it in the
            # prompt (Mistral v0.3 moves the system message into the last user turn)
            if not content:
                start = -1
            elif end is not None and end > cursor:
                start = text.rfind(content, cursor, end)
            else:
                start = text.find(content, cursor)
            if start < 0:
                raise ValueError(f"assistant message {i} is not in the chat template's rendering")
            start = max(cursor, len(text[:start].rstrip(" ")))  # "[/INST] 42": the model writes " "
        if end is None or end <= start:
            end = _turn_end(eos_token, text, start, i)
        end = len(text[:end].rstrip())
        spans.append((start, end))
        cursor = end
    return spans


def _prefix_end(text: str, prefix: str) -> int | None:
    return len(prefix) if prefix and text.startswith(prefix) else None


def _closed_turn_end(text: str, rendered: str, eos: str | None) -> int | None:
    """Where ``rendered`` (the conversation through a turn) stops in ``text``, less an EOS that
    the template writes only to close a conversation (Phi-3: ``{% else %}{{ eos_token }}``)."""
    end = _prefix_end(text, rendered)
    if end is None and eos and rendered.endswith(eos):
        end = _prefix_end(text, rendered[: -len(eos)])
    return end


def _turn_end(eos: str | None, text: str, start: int, index: int) -> int:
    """Through the first end-of-turn token after ``start``: templates that rewrite a turn
    (dropping reasoning from earlier turns, say) still close it with that token."""
    pos = text.find(eos, start) if eos else -1
    if pos < 0:
        raise ValueError(f"assistant message {index}: no end-of-turn token {eos!r} after it")
    return pos + len(eos)


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
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, train_on: TrainOn = "assistant"):
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.bos_id = bos_to_add(tokenizer)
        self.bos_token = tokenizer.bos_token
        self.eos_token = tokenizer.eos_token
        self._renderer: ChatRenderer | None = None

    @property
    def renderer(self) -> ChatRenderer:
        if self._renderer is None:
            self._renderer = ChatRenderer(self.tokenizer)
        return self._renderer

    def needs_bos(self, text: str) -> bool:
        return self.bos_id is not None and not text.startswith(self.bos_token)

    def render_example(self, example: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
        """The text of an example and the character spans to train on."""
        if "text" in example:
            text = example["text"] + (self.eos_token or "")
            return text, [(0, len(text))]
        messages, tools = example["messages"], example.get("tools")
        text = self.renderer(messages, tools=tools)
        if self.train_on == "all":
            return text, [(0, len(text))]
        spans = assistant_spans(self.renderer, messages, text, self.eos_token, tools)
        return text, spans[-1:] if self.train_on == "last_assistant" else spans

    def encode(self, examples: list[dict[str, Any]], wheres: list[str]) -> list[Tokenized]:
        """Each example rendered, tokenized once, and labelled by character offsets."""
        texts, spans = [], []
        for example, where in zip(examples, wheres, strict=True):
            with row_errors(where):
                text, example_spans = self.render_example(example)
            texts.append(text)
            spans.append(example_spans)
        out = []
        for text, (ids, offsets), sp in zip(
            texts, encode_with_offsets(self.tokenizer, texts), spans, strict=True
        ):
            ids = list(ids)
            labels = labels_for_spans(ids, offsets, sp)
            if self.needs_bos(text):  # never two BOS: only when the template wrote none
                ids, labels = [self.bos_id, *ids], [IGNORE_INDEX, *labels]
            out.append(Tokenized(ids, labels))
        return out

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Pretraining documents: BOS (if the tokenizer uses one), the text, EOS."""
        prefix = [self.bos_id] if self.bos_id is not None else []
        suffix = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return [prefix + list(ids) + suffix for ids in encode_texts(self.tokenizer, texts)]


def missing_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    """The BOS id to put before ``text`` when the tokenizer expects one and the text lacks it."""
    bos = bos_to_add(tokenizer)
    return None if bos is None or text.startswith(tokenizer.bos_token) else bos


def prompt_messages(messages: list[Message]) -> list[Message]:
    """The conversation up to (not including) its last assistant turn: a generation prompt."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return list(messages if last is None else messages[:last])


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], train_on: TrainOn = "assistant"
) -> Tokenized:
    """Ids and labels of one conversation (``ChatEncoder`` for batches)."""
    return ChatEncoder(tokenizer, train_on).encode([{"messages": messages}], ["conversation"])[0]
