"""Preference data: prompt + chosen and prompt + rejected, sharing the same prompt tokens."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from src.datamodules.base import BaseDataModule, Columns, Example
from src.datamodules.chat import IGNORE_INDEX, ChatEncoder, Message, encode_texts, row_errors
from src.datamodules.collate import PreferenceCollator
from src.datamodules.formats import to_preference
from src.datamodules.records import DataError, Record
from src.datamodules.stats import SplitStats


class PreferenceDataModule(BaseDataModule):
    """Pairs of responses to one prompt (DPO and relatives).

    Each response is its assistant turn in the rendering of prompt + response, through its
    stop token (as SFT labels), and the prompt is what comes before it, so chosen and
    rejected carry exactly the same prompt tokens. Too-long pairs keep the end of the prompt
    (and its BOS) and the start of the responses; they are counted.

    Args:
        max_prompt_length: Prompt tokens kept when a pair is too long (default: half of
            ``max_length``); a prompt keeps more when the responses leave room.
        **kwargs: See ``BaseDataModule``.
    """

    def __init__(self, *args: Any, max_prompt_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_prompt_length = max_prompt_length or self.max_length // 2
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                f"({self.max_length})"
            )

    def settings(self) -> dict[str, Any]:
        return {"max_prompt_length": self.max_prompt_length}

    @cached_property
    def encoder(self) -> ChatEncoder:
        return self.chat_encoder()

    def to_example(self, record: Record, fmt: str) -> Example:
        return to_preference(record, fmt)

    def encode_chunk(
        self, examples: list[Example], wheres: list[str]
    ) -> tuple[Columns, SplitStats]:
        prompts, chosen, rejected = [], [], []
        for example, where in zip(examples, wheres, strict=True):
            tools = example.get("tools")
            texts = {}
            for side in ("chosen", "rejected"):
                with row_errors(where):
                    texts[side] = self.encoder.split_response(
                        example["prompt"], example[side], tools
                    )
            if texts["chosen"][0] != texts["rejected"][0]:
                raise DataError(
                    f"{where}: the chat template renders the prompt differently before the "
                    "chosen and the rejected response, so the pair cannot share prompt tokens"
                )
            prompts.append(texts["chosen"][0])
            chosen.append(texts["chosen"][1])
            rejected.append(texts["rejected"][1])
        ids = encode_texts(self.tokenizer, prompts + chosen + rejected)
        n = len(examples)
        stats = SplitStats()
        columns: Columns = {
            k: []
            for k in (
                "chosen_input_ids",
                "chosen_labels",
                "rejected_input_ids",
                "rejected_labels",
                "loss_weight",
            )
        }
        for i in range(n):
            prompt_ids = list(ids[i])
            if self.encoder.needs_bos(prompts[i]):
                prompt_ids.insert(0, self.encoder.bos_id)
            responses = {"chosen": list(ids[n + i]), "rejected": list(ids[2 * n + i])}
            if responses["chosen"] == responses["rejected"]:
                stats.drop("with identical chosen and rejected responses")
                continue
            if not all(responses.values()):
                stats.drop("with an empty response")
                continue
            prompt_ids, responses = self._fit(prompt_ids, responses, stats)
            if responses["chosen"] == responses["rejected"]:
                stats.drop("with chosen and rejected identical after truncation")
                continue
            stats.examples += 1
            weight = examples[i].get("loss_weight", 1.0)
            stats.loss_weighted += weight != 1.0
            columns["loss_weight"].append(weight)
            for side, response in responses.items():
                columns[f"{side}_input_ids"].append(prompt_ids + response)
                columns[f"{side}_labels"].append([IGNORE_INDEX] * len(prompt_ids) + response)
                stats.tokens += len(prompt_ids) + len(response)
                stats.trained_tokens += len(response)
        return columns, stats

    def _fit(
        self, prompt: list[int], responses: dict[str, list[int]], stats: SplitStats
    ) -> tuple[list[int], dict[str, list[int]]]:
        """Truncate a too-long pair: the prompt keeps its end, the responses their start."""
        longest = max(map(len, responses.values()))
        if len(prompt) + longest <= self.max_length:
            return prompt, responses
        stats.truncated += 1
        keep = min(len(prompt), max(self.max_prompt_length, self.max_length - longest))
        if keep < len(prompt):
            bos_id = self.tokenizer.bos_token_id  # written by the template or added by us
            has_bos = bos_id is not None and prompt[0] == bos_id
            prompt = prompt[:1] + prompt[len(prompt) - keep + 1 :] if has_bos else prompt[-keep:]
        room = self.max_length - len(prompt)
        return prompt, {side: r[:room] for side, r in responses.items()}

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def sample_prompts(self, n: int | None = None) -> list[tuple[list[Message], str]]:
        """The first ``n`` validation prompts with their chosen responses as references."""
        return [(e["prompt"], e["chosen"][0].get("content") or "") for e in self.val_examples[:n]]
