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

# An e-mail address: a local part, "@", and a domain that ends in a top-level domain of letters.
EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@"
    r"(?!\d+(?:\.\d+)?x\.)"  # not an image's pixel-density suffix: icon@2x.png, logo@1.5x.jpg
    r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)

# A phone number has one of four shapes, and ordinary numbers (years and year ranges,
# decimals, ISBNs, times, dates, versions, coordinates, arithmetic, amounts) fit none of
# them. Groups are separated by one space, hyphen or dot: never "/" (2019/2020, 1/3), ":"
# (12:30:45), "," (1,234,567.89) or a dash (1939–1945).
_SEP = r"[ .-]"
_PHONE_SHAPES = {
    # +44 20 7946 0958, +1 (555) 123-4567, +44 (0)20 7946 0958, +33 1 23 45 67 89: the "+"
    # is what marks a phone number, so the groups after it may be of any size (the digits are
    # counted in _is_phone). A space, hyphen or "(" follows the country code, never a dot:
    # "+40.7128" and "+40.7128-074.0060" are signed coordinates.
    "intl": (
        r"\+\d{1,3}"  # the country code
        rf"(?:{_SEP}?\(\d{{1,4}}\){_SEP}?|[ -])"  # "(0)" or "(area)", or a space or hyphen
        rf"\d{{1,8}}(?:{_SEP}\d{{1,8}}){{0,5}}"  # the rest of the number, in groups
    ),
    # (555) 123-4567, (020) 7946 0958: the area code in parentheses is a North American one
    # (3 digits, never starting with 0 or 1) or one with the trunk prefix 0, so a year in
    # parentheses before a number, "(1999) 2000", "(2019) 123-456", is not one.
    "area": rf"\((?:[2-9]\d\d|0[1-9]\d{{0,3}})\){_SEP}?\d{{3,4}}{_SEP}?\d{{3,4}}",
    # 555-123-4567, 555.123.4567, 1-800-555-0199: North American 3-3-4 digits (area code not
    # starting with 0 or 1); 4-4 (1812-1815, 1234 5678) and 3-4 (100-1000 words) are ranges
    # and lists far more often than local numbers, so they are left alone.
    "nanp": rf"(?:1{_SEP})?[2-9]\d\d{_SEP}\d{{3}}{_SEP}\d{{4}}",
    # 020 7946 0958, 030 1234567, 03-1234-5678: a national number starts with the trunk
    # prefix 0 and an area code, then groups of 3+ digits; years, decimals, dates and ISBNs
    # do not (0.5, 05.01.2024, ISBN 0-306-40615-2). 10 to 12 digits in all (counted in
    # _is_phone): fewer are ZIP+4 codes (02134-1234) and ISSNs (0317-8471).
    "trunk": rf"0[1-9]\d{{0,3}}(?:{_SEP}\d{{3,8}}){{1,3}}",
}
PHONE = re.compile(
    # a number of its own: not the tail of a word or a sum ("x555", "2+2"), nor the rest of
    # a longer number ("1.5", "10:30", "1/3", "1,234", "2024-01-15")
    r"(?<![\w+])(?<!\d[.,:/-])"
    + "(?:"
    + "|".join(f"(?P<{name}>{shape})" for name, shape in _PHONE_SHAPES.items())
    + ")"
    # ... and not followed by more of it: 555-123-4567-8, 020 7946 0958.5
    + r"(?![.,:/-]?\d)"
)
# digits a phone number of the shape may hold (E.164 allows 15 at most, with the country code)
_PHONE_DIGITS = {"intl": (8, 15), "trunk": (10, 12)}


def _is_phone(match: re.Match) -> bool:
    """Whether a ``PHONE`` match holds as many digits as its shape allows."""
    low, high = _PHONE_DIGITS.get(match.lastgroup or "", (0, 99))
    return low <= sum(c.isdigit() for c in match.group(0)) <= high


@dataclass
class Filters:
    """Filters applied before the validation split and tokenization (counted).

    Args:
        min_tokens: Drop examples with fewer tokens than this.
        max_tokens: Drop examples with more tokens than this (instead of truncating them
            to ``max_length``).
        dedup: Drop exact duplicates (after format conversion); a validation example equal
            to a training example is dropped from validation.
        scrub_pii: Replace e-mail addresses with ``<EMAIL>`` and phone numbers with ``<PHONE>``
            (international, North American and national shapes; years, decimals, dates,
            times, versions and ISBNs are left alone).
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
