"""What preparation did to a split, reported before training starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LENGTH_BIN = 64  # tokens: the resolution of the length histogram and of suggestions
TRUNCATION_WARN = 0.05  # share of truncated examples above which preparation warns


@dataclass
class SplitStats:
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    loss_weighted: int = 0  # examples whose loss weight is not 1
    dropped: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    template: dict[str, int] = field(default_factory=dict)  # what the chat template did
    lengths: dict[int, int] = field(default_factory=dict)  # examples per LENGTH_BIN of tokens
    packed_rows: int = 0
    row_length: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def count(self, what: str, n: int = 1) -> None:
        self.filtered[what] = self.filtered.get(what, 0) + n

    def note_template(self, example: Any) -> None:
        """Count what the chat template dropped from an example (a ``Tokenized`` or a
        ``Rendered``), or left unclosed."""
        for part in example.dropped:
            self._note(f"conversations whose {part} the chat template dropped")
        if example.unstopped:
            self._note(
                "assistant turns with no token generation stops on (set data.stop_token)",
                example.unstopped,
            )
        if example.appended:
            self._note(f"last turns the template leaves open, closed with {example.appended}")
        if example.empty_turns:
            self._note("empty assistant turns, not trained", example.empty_turns)

    def record_length(self, n: int) -> None:
        """Count an example of ``n`` tokens (before truncation), by bins of ``LENGTH_BIN``."""
        key = max(0, n - 1) // LENGTH_BIN
        self.lengths[key] = self.lengths.get(key, 0) + 1

    def length_covering(self, share: float) -> int | None:
        """The smallest multiple of ``LENGTH_BIN`` that holds ``share`` of the examples."""
        total, seen = sum(self.lengths.values()), 0
        for key in sorted(self.lengths):
            seen += self.lengths[key]
            if seen >= share * total:
                return (key + 1) * LENGTH_BIN
        return None

    def truncation_warning(self, split: str, max_length: int) -> str | None:
        """A warning when more than ``TRUNCATION_WARN`` of the examples were truncated."""
        counted = sum(self.lengths.values())
        if not counted or self.truncated <= TRUNCATION_WARN * counted:
            return None
        keep = self.length_covering(0.99)
        return (
            f"[data] {split}: {self.truncated} of {counted} examples "
            f"({self.truncated / counted:.1%}) are longer than max_length {max_length} and "
            f"were truncated; max_length {keep} would keep 99% of them whole"
        )

    def _note(self, what: str, n: int = 1) -> None:
        self.template[what] = self.template.get(what, 0) + n

    def merge(self, other: SplitStats) -> None:
        for name in (
            "rows",
            "examples",
            "tokens",
            "trained_tokens",
            "truncated",
            "loss_weighted",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.dropped.items():
            self.drop(reason, n)
        for what, n in other.filtered.items():
            self.count(what, n)
        for what, n in other.template.items():
            self._note(what, n)
        for key, n in other.lengths.items():
            self.lengths[key] = self.lengths.get(key, 0) + n

    @property
    def packing_efficiency(self) -> float | None:
        """Share of the packed rows' capacity that holds real tokens."""
        if not self.packed_rows:
            return None
        return self.tokens / (self.packed_rows * self.row_length)

    def summary(self, split: str) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        text = (
            f"{split}: {self.rows} rows -> {self.examples} examples, {self.tokens} tokens "
            f"({self.trained_tokens} trained); truncated {self.truncated}; dropped: {drops}"
        )
        if self.filtered:
            text += "; filters: " + ", ".join(f"{n} {w}" for w, n in self.filtered.items())
        if self.template:
            text += "; chat template: " + ", ".join(f"{n} {w}" for w, n in self.template.items())
        if self.loss_weighted:
            text += f"; {self.loss_weighted} examples with a loss weight other than 1"
        if self.packed_rows:
            text += (
                f"; packed into {self.packed_rows} rows of {self.row_length} "
                f"({self.packing_efficiency:.1%} filled)"
            )
        return text
