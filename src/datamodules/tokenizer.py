"""Loading the tokenizer that data preparation, generation and the export share."""

from __future__ import annotations

from typing import NamedTuple

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from src.datamodules.templates import resolve_chat_template
from src.local_paths import check_local_path


class TokenizerKey(NamedTuple):
    """What ``load_tokenizer`` is given: equal keys load equal tokenizers."""

    name_or_path: str
    trust_remote_code: bool = False
    chat_template: str | None = None


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """A new tokenizer with a pad token (EOS stands in) and, if given, a chat template."""
    check_local_path(name_or_path, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = resolve_chat_template(chat_template)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer
