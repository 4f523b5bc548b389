"""Reward functions for online RL (``src.modules.rewards``): each shipped one on the demo's
kind of answers, a user's own by its path, weights, and errors that name function and row."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from src.modules.rewards import (
    ExactMatch,
    FormatMatch,
    LengthPenalty,
    NumericMatch,
    RewardError,
    RewardSet,
    load_function,
)

PROMPTS = ["What is 69 + 14?", "Uppercase: gold goat", "How many words are in: slow crab"]


def test_exact_match_ignores_surrounding_and_repeated_whitespace_only():
    fn = ExactMatch()
    got = fn(PROMPTS, [" 83\n", "GOLD  GOAT", "two"], answer=["83", "GOLD GOAT", "2"])
    assert got == [1.0, 1.0, 0.0]
    assert fn(PROMPTS[:1], ["gold goat"], answer=["GOLD GOAT"]) == [0.0]
    assert ExactMatch(case_sensitive=False)(PROMPTS[:1], ["gold goat"], answer=["GOLD GOAT"]) == [
        1.0
    ]
    assert fn(PROMPTS[:1], ["83"], answer=[None]) == [None]  # a row without an answer


def test_numeric_match_takes_the_last_number_within_the_tolerance():
    fn = NumericMatch(tolerance=0.01)
    completions = ["The sum is 83.", "69 + 14 = 84", "1,024", "no number", "83.004"]
    answers = ["83", "83", 1024, "83", "83"]
    assert fn(["p"] * 5, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert fn(["p"], ["83"], answer=["eighty-three"]) == [None]  # not a number: no verdict
    assert fn(["p"], ["sorted: 1,2,3"], answer=["3"]) == [1.0]  # a list, not 123
    relative = NumericMatch(tolerance=0.1, relative=True)
    assert relative(["p", "p"], ["105", "115"], answer=["100", "100"]) == [1.0, 0.0]


def test_format_match_searches_or_matches_whole():
    anywhere = FormatMatch(r"<answer>\d+</answer>")
    assert anywhere(["p"] * 2, ["so <answer>83</answer>", "83"]) == [1.0, 0.0]
    whole = FormatMatch(r"\d+", full=True)
    assert whole(["p"] * 2, [" 83 ", "83 apples"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="is not a regular expression"):
        FormatMatch("(")


def test_length_penalty_counts_the_words_beyond_the_limit():
    fn = LengthPenalty(max_words=2, per_word=0.5)
    assert fn(["p"] * 3, ["83", "a b", "a b c d"]) == [0.0, 0.0, -1.0]


def test_a_weighted_set_sums_and_leaves_out_what_a_function_does_not_score():
    rewards = RewardSet([ExactMatch(), LengthPenalty(max_words=1, per_word=1.0)], [2.0, 1.0])
    total, each = rewards(PROMPTS, ["83", "GOLD GOAT", "2"], {"answer": ["83", "GOLD GOAT", None]})
    assert rewards.names == ["exact_match(answer)", "length_penalty"]
    torch.testing.assert_close(total, torch.tensor([2.0, 2.0 - 1.0, 0.0]))
    assert math.isnan(each[0, 2]) and each[1, 2] == 0.0


def test_a_users_own_function_by_its_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, **fields):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n"
        "class Contains:\n"
        "    def __init__(self, word):\n"
        "        self.word = word\n"
        "    def __call__(self, prompts, completions, **fields):\n"
        "        return [float(self.word in c) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    rewards = RewardSet(
        ["my_rewards.brevity", {"class_path": "my_rewards.Contains", "init_args": {"word": "8"}}]
    )
    total, _ = rewards(["p", "p"], ["83", "1234"], {})
    torch.testing.assert_close(total, torch.tensor([1 / 3 + 1.0, 1 / 5]))
    with pytest.raises(ValueError, match="cannot import it"):
        load_function("my_rewards.missing")
    with pytest.raises(ValueError, match="takes no init_args"):
        load_function({"class_path": "my_rewards.brevity", "init_args": {"x": 1}})


def test_a_failing_function_is_named_with_the_row_it_fails_on():
    def picky(prompts, completions, **fields):
        return [1.0 / (len(c) - 2) for c in completions]  # a two-letter completion divides by 0

    with pytest.raises(RewardError) as err:
        RewardSet([picky])(PROMPTS, ["83 is it", "GO", "2"], {})
    message = str(err.value)
    assert message.startswith("reward function picky failed on row 1 (prompt 'Uppercase: gold")
    assert "ZeroDivisionError" in message


def test_a_function_returning_the_wrong_thing_is_named():
    with pytest.raises(RewardError, match="returned 1 values for 3 completions"):
        RewardSet([lambda prompts, completions, **f: [1.0]])(PROMPTS, ["a", "b", "c"], {})
    with pytest.raises(RewardError, match=r"returned 'yes' for row 0 \(prompt 'What is 69"):
        RewardSet([lambda prompts, completions, **f: ["yes"] * 3])(PROMPTS, ["a", "b", "c"], {})
    with pytest.raises(RewardError, match="reads the column 'answer', which the rows do not"):
        RewardSet([ExactMatch()])(PROMPTS, ["a", "b", "c"], {"target": ["1", "2", "3"]})
