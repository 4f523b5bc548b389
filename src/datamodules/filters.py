"""Quality filters on canonical examples: exact de-duplication and PII scrubbing.

Length filters work on token counts and live with the encoders; every filter counts what it
did, and the counts are reported before training starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# phone-shaped candidates: digit groups joined by separators, maybe after "+cc" or "(area)"
PHONE = re.compile(
    r"(?<![\w+(])(?P<intl>\+\d{1,3}[ .-]?)?(?P<area>\(\d{1,4}\)[ .-]?)?"
    r"\d{1,4}(?:[ .-]\d{1,4}){1,4}(?![\w.-]?\d)"
)


def _is_phone(match: re.Match) -> bool:
    """7 to 15 digits; without "+" or "(area)", groups of 3+ digits ending in 4, so lists
    of small numbers ("41 39 12 48") and arithmetic stay untouched."""
    text = match.group(0)
    digits = sum(c.isdigit() for c in text)
    if not 7 <= digits <= 15:
        return False
    if match.group("intl") or match.group("area"):
        return True
    groups = re.split(r"[ .-]", text)
    return all(len(g) >= 3 for g in groups) and len(groups[-1]) == 4


@dataclass
class Filters:
    """Filters applied before the validation split and tokenization (counted).

    Args:
        min_tokens: Drop examples with fewer tokens than this.
        max_tokens: Drop examples with more tokens than this (instead of truncating them
            to ``max_length``).
        dedup: Drop exact duplicates (after format conversion); a validation example equal
            to a training example is dropped from validation.
        scrub_pii: Replace e-mail addresses with ``<EMAIL>`` and phone numbers with ``<PHONE>``.
    """

    min_tokens: int = 0
    max_tokens: int | None = None
    dedup: bool = False
    scrub_pii: bool = False

    def token_verdict(self, n_tokens: int) -> str | None:
        """Why an example of ``n_tokens`` tokens is dropped, or None to keep it."""
        if n_tokens < self.min_tokens:
            return f"shorter than min_tokens={self.min_tokens}"
        if self.max_tokens is not None and n_tokens > self.max_tokens:
            return f"longer than max_tokens={self.max_tokens}"
        return None


def example_hash(example: Any) -> bytes:
    return hashlib.blake2b(
        json.dumps(example, sort_keys=True, ensure_ascii=False).encode(), digest_size=16
    ).digest()


def scrub(value: Any, counts: dict[str, int]) -> Any:
    """``value`` with e-mail addresses and phone numbers replaced in every string it holds."""
    if isinstance(value, str):
        value, n_email = EMAIL.subn("<EMAIL>", value)
        n_phone = 0

        def phone(match: re.Match) -> str:
            nonlocal n_phone
            if not _is_phone(match):
                return match.group(0)
            n_phone += 1
            return "<PHONE>"

        value = PHONE.sub(phone, value)
        counts["e-mail addresses"] = counts.get("e-mail addresses", 0) + n_email
        counts["phone numbers"] = counts.get("phone numbers", 0) + n_phone
        return value
    if isinstance(value, list):
        return [scrub(v, counts) for v in value]
    if isinstance(value, dict):
        return {k: v if k == "role" else scrub(v, counts) for k, v in value.items()}
    return value
