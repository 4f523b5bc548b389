"""Reward functions for online RL: a completion scored by a program, not a model.

A reward function is any callable ``fn(prompts, completions, **fields) -> list[float | None]``:
``prompts`` and ``completions`` are lists of strings of the same length, and ``fields`` holds
each other column of the rows as a list (``answer=["83", ...]``). It returns one number per
completion, or ``None`` where it has nothing to say about that row (left out of the row's
group statistics, as TRL does). A user's own function lives in their own module and is named by
its path, e.g. ``my_rewards.brevity``; a class is instantiated with its arguments first.

The shipped ones: :class:`ExactMatch`, :class:`NumericMatch`, :class:`FormatMatch`,
:class:`LengthPenalty`. :class:`RewardSet` calls a weighted list of them and names the
function and the row when one fails.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFunction = Callable[..., Sequence[float | None]]
# a number, with thousands separated by commas ("1,024") but not a list ("1,2,3")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


class RewardError(ValueError):
    """A reward function failed or returned something other than one number per row."""


def _normalise(text: str, case_sensitive: bool) -> str:
    text = " ".join(str(text).split())
    return text if case_sensitive else text.lower()


class ExactMatch:
    """1 where the completion, stripped and with runs of whitespace as one space, equals the
    row's ``field``; else 0. A row without the field gets None.

    Args:
        field: The column holding the reference answer.
        case_sensitive: Compare letters as written (``GOLD`` is not ``gold``).
    """

    def __init__(self, field: str = "answer", case_sensitive: bool = True) -> None:
        self.field = field
        self.case_sensitive = case_sensitive
        self.__name__ = f"exact_match({field})"

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list:
        answers = _column(fields, self.field, len(completions), self.__name__)
        return [
            None
            if answer is None
            else float(
                _normalise(c, self.case_sensitive) == _normalise(answer, self.case_sensitive)
            )
            for c, answer in zip(completions, answers, strict=True)
        ]


class NumericMatch:
    """1 where the last number in the completion is within ``tolerance`` of the row's
    ``field`` (absolute, or relative to it with ``relative: true``); 0 where it is not or the
    completion holds no number; None where the reference is not a number.

    Args:
        field: The column holding the reference number.
        tolerance: The largest difference that still matches.
        relative: ``tolerance`` is a share of the reference's magnitude.
    """

    def __init__(self, field: str = "answer", tolerance: float = 1e-6, relative: bool = False):
        self.field = field
        self.tolerance = tolerance
        self.relative = relative
        self.__name__ = f"numeric_match({field})"

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list:
        answers = _column(fields, self.field, len(completions), self.__name__)
        out: list[float | None] = []
        for completion, answer in zip(completions, answers, strict=True):
            reference = _number(answer)
            if reference is None:
                out.append(None)
                continue
            found = _NUMBER.findall(str(completion))
            value = _number(found[-1]) if found else None
            bound = self.tolerance * (abs(reference) if self.relative else 1.0)
            out.append(float(value is not None and abs(value - reference) <= bound))
        return out


def _number(value: Any) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    try:
        return float(str(value).replace(",", "").strip())
    except ValueError:
        return None


class FormatMatch:
    """1 where the completion matches ``pattern`` (a Python regular expression; the whole
    completion with ``full: true``, else anywhere in it), else 0.

    Args:
        pattern: The regular expression, e.g. ``"^<answer>.*</answer>$"``.
        full: Match the whole completion (stripped), not a part of it.
    """

    def __init__(self, pattern: str, full: bool = False) -> None:
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise ValueError(
                f"FormatMatch: {pattern!r} is not a regular expression: {err}"
            ) from err
        self.full = full
        self.__name__ = "format_match"

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list:
        match = self.regex.fullmatch if self.full else self.regex.search
        return [float(match(c.strip() if self.full else c) is not None) for c in completions]


class LengthPenalty:
    """``-per_word`` for each word of the completion beyond ``max_words``; 0 up to it.

    Args:
        max_words: Words allowed without penalty.
        per_word: The penalty of each word more.
    """

    def __init__(self, max_words: int = 16, per_word: float = 0.1) -> None:
        self.max_words = max_words
        self.per_word = per_word
        self.__name__ = "length_penalty"

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list:
        return [-self.per_word * max(0, len(c.split()) - self.max_words) for c in completions]


def _column(fields: dict[str, Any], name: str, n: int, function: str) -> list:
    if name not in fields:
        raise RewardError(
            f"{function} reads the column {name!r}, which the rows do not have (they have: "
            f"{', '.join(sorted(fields)) or 'no other column'}); map it with data.columns"
        )
    return list(fields[name])


def load_function(spec: str | dict[str, Any] | RewardFunction) -> RewardFunction:
    """A reward function from a dotted path (``my_rewards.brevity``), a
    ``{class_path, init_args}`` dict (a class, instantiated), or a callable."""
    if callable(spec):
        return spec
    if isinstance(spec, str):
        spec = {"class_path": spec}
    path = spec.get("class_path")
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"a reward function needs a class_path such as module.name, got {spec!r}")
    module_name, _, attribute = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward function {path}: cannot import it ({err})") from err
    args = spec.get("init_args") or {}
    if isinstance(target, type):
        return target(**args)
    if args:
        raise ValueError(f"reward function {path} is a function: it takes no init_args")
    return target


class RewardSet:
    """Weighted reward functions, called on a batch of completions.

    Args:
        functions: Each a dotted path, a ``{class_path, init_args}`` dict, or a callable.
        weights: One per function (default 1 each); the reward is the weighted sum, the
            functions that return None for a row left out of it (NaN where all do).
    """

    def __init__(self, functions: Sequence[Any], weights: Sequence[float] | None = None) -> None:
        if not functions:
            raise ValueError("name at least one reward function")
        self.functions = [load_function(f) for f in functions]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.functions)
        if len(self.weights) != len(self.functions):
            raise ValueError(
                f"{len(self.weights)} reward weights for {len(self.functions)} reward functions"
            )
        self.names = [getattr(f, "__name__", type(f).__name__) for f in self.functions]

    def __call__(
        self, prompts: list[str], completions: list[str], fields: dict[str, list]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The total reward per completion, and each function's ``(functions, completions)``
        (NaN for None)."""
        clash = sorted(set(fields) & {"prompts", "completions"})
        if clash:
            raise RewardError(
                f"the rows have a column named {clash[0]!r}, the name of a reward function's "
                "argument: rename it with data.columns"
            )
        per_function = torch.full((len(self.functions), len(completions)), math.nan)
        for i, (name, function) in enumerate(zip(self.names, self.functions, strict=True)):
            try:
                values = list(function(prompts=prompts, completions=completions, **fields))
            except RewardError:
                raise
            except Exception as err:
                raise _failure(name, function, prompts, completions, fields, err) from err
            if len(values) != len(completions):
                raise RewardError(
                    f"reward function {name} returned {len(values)} values for "
                    f"{len(completions)} completions"
                )
            for row, value in enumerate(values):
                if value is None:
                    continue
                if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                    raise RewardError(
                        f"reward function {name} returned {value!r} for row {row} (prompt "
                        f"{prompts[row][:60]!r}): a finite number or None is needed"
                    )
                per_function[i, row] = float(value)
        weights = torch.tensor(self.weights).view(-1, 1)
        scored = ~torch.isnan(per_function)
        total = torch.where(scored, per_function * weights, 0.0).sum(0)
        total[~scored.any(0)] = math.nan
        return total, per_function


def _failure(
    name: str,
    function: RewardFunction,
    prompts: list[str],
    completions: list[str],
    fields: dict[str, list],
    err: Exception,
) -> RewardError:
    """The error of a function that failed on a batch, naming the first row it fails on alone
    (each row called by itself: reward functions are programs, cheap to call again)."""
    for row in range(len(completions)):
        one = {key: [values[row]] for key, values in fields.items()}
        try:
            function(prompts=[prompts[row]], completions=[completions[row]], **one)
        except Exception as row_err:  # noqa: BLE001 - reported, with the row
            return RewardError(
                f"reward function {name} failed on row {row} (prompt {prompts[row][:60]!r}, "
                f"completion {completions[row][:60]!r}): {type(row_err).__name__}: {row_err}"
            )
    return RewardError(f"reward function {name} failed: {type(err).__name__}: {err}")
