"""Preference data: prompt + chosen and prompt + rejected, sharing the same prompt tokens."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from src.datamodules.base import BaseDataModule, Columns, Example, as_list
from src.datamodules.chat import (
    IGNORE_INDEX,
    ChatEncoder,
    Message,
    Response,
    encode_texts,
    encode_with_offsets,
    labels_for_spans,
    row_errors,
)
from src.datamodules.collate import PreferenceCollator, padded_rows
from src.datamodules.formats import to_preference
from src.datamodules.packing import pack_pairs
from src.datamodules.records import DataError, Record
from src.datamodules.sft import read_prompts
from src.datamodules.stats import SplitStats

Encoded = tuple[list[int], list[int]]  # a response's ids and labels


class PreferenceDataModule(BaseDataModule):
    """Pairs of responses to one prompt (DPO and relatives).

    Each response is its assistant turn in the rendering of prompt + response, through its
    stop token (as SFT labels), and the prompt is what comes before it, so chosen and
    rejected carry exactly the same prompt tokens. Too-long pairs keep the end of the prompt
    (and its BOS) and the start of the responses; they are counted.

    ``max_length`` bounds each sequence (prompt + one response). With ``packing``, whole
    pairs are packed into rows of ``pack_length`` tokens by best-fit-decreasing, a row's
    sequences each with ``position_ids`` from 0 and no attention across them; a batch then
    holds ``batch_size`` rows of any number of pairs, and the loss is still the mean over
    the pairs of a step.

    Args:
        max_prompt_length: Prompt tokens kept when a pair is too long (default: half of
            ``max_length``); a prompt keeps more when the responses leave room.
        packing: Pack pairs into rows (padding-free preference training).
        pack_length: Tokens per packed row (default ``2 * max_length``, which any pair fits).
        predict_files: Conversations for a reward model's ``predict``: rows of any chat
            format (or a ``prompt`` with a ``completion``); each is scored at the end of its
            last assistant turn. Default: the validation pairs, chosen then rejected.
        **kwargs: See ``BaseDataModule``.
    """

    score_unit = "pairs"

    def __init__(
        self,
        *args: Any,
        max_prompt_length: int | None = None,
        packing: bool = False,
        pack_length: int | None = None,
        predict_files: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.predict_files = as_list(predict_files)
        self.predict_ids: list[Any] = []  # the ids of the predicted rows, filled by the loader
        self.max_prompt_length = prompt_budget(max_prompt_length, self.max_length)
        self.packing = packing
        self.pack_length = pack_length or 2 * self.max_length
        if self.pack_length < 2:
            raise ValueError(f"pack_length must be at least 2, got {self.pack_length}")

    def settings(self) -> dict[str, Any]:
        packing = {"packing": True, "pack_length": self.pack_length} if self.packing else {}
        return {"max_prompt_length": self.max_prompt_length, **packing}

    def finalize(self, columns: Columns, stats: SplitStats) -> Columns:
        if not self.packing:
            return columns
        try:
            packed = pack_pairs(columns, self.pack_length)
        except ValueError as err:
            raise DataError(
                f"{err}: raise data.init_args.pack_length (its default, 2 * max_length = "
                f"{2 * self.max_length}, fits every pair)"
            ) from None
        stats.packed_rows, stats.row_length = len(packed["input_ids"]), self.pack_length
        return packed

    @cached_property
    def encoder(self) -> ChatEncoder:
        return self.chat_encoder()

    def to_example(self, record: Record, fmt: str) -> Example:
        return to_preference(record, fmt)

    def encode_chunk(
        self, examples: list[Example], wheres: list[str]
    ) -> tuple[Columns, SplitStats]:
        prompts: list[str] = []
        sides: dict[str, list[Response]] = {"chosen": [], "rejected": []}
        stats = SplitStats()
        for example, where in zip(examples, wheres, strict=True):
            tools = example.get("tools")
            for side, out in sides.items():
                with row_errors(where):
                    out.append(self.encoder.split_response(example["prompt"], example[side], tools))
            chosen, rejected = sides["chosen"][-1], sides["rejected"][-1]
            if chosen.prompt != rejected.prompt:
                raise DataError(
                    f"{where}: the chat template renders the prompt differently before the "
                    "chosen and the rejected response, so the pair cannot share prompt tokens"
                )
            prompts.append(chosen.prompt)
            stats.note_template(chosen.rendered)
        prompt_ids = encode_texts(self.tokenizer, prompts)
        encoded = {
            side: encode_with_offsets(self.tokenizer, [r.text for r in responses])
            for side, responses in sides.items()
        }
        columns: Columns = {
            k: []
            for k in (
                "chosen_input_ids",
                "chosen_labels",
                "rejected_input_ids",
                "rejected_labels",
                "loss_weight",
                "margin",
            )
        }
        for i, example in enumerate(examples):
            prompt = list(prompt_ids[i])
            if self.encoder.needs_bos(prompts[i]):
                prompt.insert(0, self.encoder.bos_id)
            responses = {}
            for side in sides:
                ids, offsets = encoded[side][i]
                responses[side] = (list(ids), labels_for_spans(ids, offsets, sides[side][i].spans))
            if responses["chosen"][0] == responses["rejected"][0]:
                stats.drop("with identical chosen and rejected responses")
                continue
            if not all(ids for ids, _ in responses.values()):
                stats.drop("with an empty response")
                continue
            stats.record_length(len(prompt) + max(len(ids) for ids, _ in responses.values()))
            prompt, responses = self._fit(prompt, responses, stats)
            if responses["chosen"][0] == responses["rejected"][0]:
                stats.drop("with chosen and rejected identical after truncation")
                continue
            stats.examples += 1
            weight = example.get("loss_weight", 1.0)
            stats.loss_weighted += weight != 1.0
            columns["loss_weight"].append(weight)
            columns["margin"].append(example.get("margin", 0.0))
            for side, (ids, labels) in responses.items():
                columns[f"{side}_input_ids"].append(prompt + ids)
                columns[f"{side}_labels"].append([IGNORE_INDEX] * len(prompt) + labels)
                stats.tokens += len(prompt) + len(ids)
                stats.trained_tokens += sum(label != IGNORE_INDEX for label in labels)
        return columns, stats

    def _fit(
        self, prompt: list[int], responses: dict[str, Encoded], stats: SplitStats
    ) -> tuple[list[int], dict[str, Encoded]]:
        """Truncate a too-long pair: the prompt keeps its end, the responses their start."""
        bos_id = self.tokenizer.bos_token_id  # written by the template or added by us
        return fit_to_length(
            prompt, responses, self.max_length, self.max_prompt_length, bos_id, stats
        )

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def sample_prompts(self, n: int | None = None) -> list[tuple[list[Message], str]]:
        """The first ``n`` validation prompts with their chosen responses as references."""
        return [(e["prompt"], e["chosen"][0].get("content") or "") for e in self.val_examples[:n]]

    # ---------------------------------------------------------------- predict
    def setup(self, stage: str | None = None) -> None:
        if stage != "predict" or not self.predict_files:
            super().setup(stage)

    def predict_dataloader(self) -> DataLoader:
        """``predict`` batches, in input order. A policy (DPO) generates from lists of (prompt
        messages, reference), by default the validation prompts with their chosen responses.
        A reward model (a module with ``predicts_scores``) scores: ``input_ids`` and
        ``attention_mask`` encoded as the training pairs are, and ``rows`` (prompt messages,
        response text), by default both responses of every validation pair. ``predict_ids``
        keeps each row's ``id`` (``None`` without one)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        scoring = getattr(module, "predicts_scores", False)
        ids: list[Any] = []
        if self.predict_files:
            found = read_prompts(self.predict_files)
            rows, ids = [(p, r) for p, r, _ in found], [i for _, _, i in found]
        elif scoring:
            rows = [
                (e["prompt"], e[side][0].get("content") or "")
                for e in self.val_examples
                for side in ("chosen", "rejected")
            ]
        else:
            rows = self.sample_prompts()
        self.predict_ids = ids or [None] * len(rows)
        if not scoring:
            return self.prompt_loader(rows)
        for n, (_, response) in enumerate(rows):
            if not response:
                raise DataError(f"predict row {n + 1} has no assistant answer to score")
        return self.prompt_loader(rows, self._collate_scored)

    def _collate_scored(self, rows: list[tuple[list[Message], str]]) -> dict[str, Any]:
        stats = SplitStats()
        ids = [self.encode_scored(prompt, response, stats) for prompt, response in rows]
        if stats.truncated:
            rank_zero_warn(
                f"{stats.truncated} predict rows are longer than max_length "
                f"({self.max_length}): each is cut as training pairs are, and scored at the cut"
            )
        batch = padded_rows(ids, self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        return batch | {"rows": rows}

    def encode_scored(
        self, prompt: list[Message], response: str, stats: SplitStats | None = None
    ) -> list[int]:
        """The token ids of prompt + response as a training pair's side, truncated alike
        (counted in ``stats``)."""
        answer: list[Message] = [{"role": "assistant", "content": response}]
        split = self.encoder.split_response(prompt, answer, None)
        ids = list(encode_texts(self.tokenizer, [split.prompt])[0])
        if self.encoder.needs_bos(split.prompt):
            ids.insert(0, self.encoder.bos_id)
        ((response_ids, offsets),) = encode_with_offsets(self.tokenizer, [split.text])
        side = (list(response_ids), labels_for_spans(response_ids, offsets, split.spans))
        ids, fitted = self._fit(ids, {"chosen": side}, stats or SplitStats())
        return ids + fitted["chosen"][0]


def prompt_budget(max_prompt_length: int | None, max_length: int) -> int:
    """The prompt tokens a too-long example keeps at the least (default: half of
    ``max_length``), checked to leave room for a response."""
    budget = max_prompt_length or max_length // 2
    if not 0 < budget < max_length:
        raise ValueError(f"max_prompt_length ({budget}) must be below max_length ({max_length})")
    return budget


def fit_to_length(
    prompt: list[int],
    responses: dict[str, Encoded],
    max_length: int,
    max_prompt_length: int,
    bos_id: int | None,
    stats: SplitStats,
) -> tuple[list[int], dict[str, Encoded]]:
    """Truncate a too-long example (prompt + each response), counted in ``stats``: the prompt
    keeps its end, its BOS and at least ``max_prompt_length`` tokens, the responses their
    start."""
    longest = max(len(ids) for ids, _ in responses.values())
    if len(prompt) + longest <= max_length:
        return prompt, responses
    stats.truncated += 1
    keep = min(len(prompt), max(max_prompt_length, max_length - longest))
    if keep < len(prompt):
        has_bos = bos_id is not None and prompt[0] == bos_id
        prompt = prompt[:1] + prompt[len(prompt) - keep + 1 :] if has_bos else prompt[-keep:]
    room = max_length - len(prompt)
    return prompt, {side: (ids[:room], labels[:room]) for side, (ids, labels) in responses.items()}
