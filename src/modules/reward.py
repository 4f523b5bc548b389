"""Reward models: a scalar score per sequence, trained on preference pairs (Bradley-Terry)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from transformers import AutoModelForSequenceClassification

from src.modules.base import CausalLMModule, LossTerms
from src.modules.head import MODEL_INPUTS
from src.modules.losses import bradley_terry_loss
from src.modules.pairs import pair_inputs


class RewardModule(CausalLMModule):
    """A causal LM with a one-output head on its last hidden states
    (``AutoModelForSequenceClassification``, ``num_labels: 1``), scoring each sequence at its
    last real token, trained on the pairs of ``PreferenceDataModule`` with
    ``-log sigmoid(r_chosen - r_rejected - margin)`` (``losses.bradley_terry_loss``).

    From a causal LM checkpoint (an SFT export) the body is loaded and the head ``score``
    starts new; under LoRA the head is trained whole beside the adapters. The score is read
    where the last token with attention sits (right or left padding), or at the last token of
    each packed sequence, so it never depends on the pad token's id. The export loads with
    ``AutoModelForSequenceClassification``, whose own pooling (the last token that is not the
    pad id) reads the same position when the pad token is not a token of the sequences.

    The loss of a step is the mean over its pairs; a row's ``margin`` field (a required score
    gap, as Llama 2's) enters the loss. ``predict`` writes a score per row.

    Args:
        center_rewards_coefficient: Weight of ``(r_chosen + r_rejected)^2`` per pair, which
            keeps the rewards centred on 0 (TRL's setting of the same name); 0 = none.
        **kwargs: See ``CausalLMModule`` (``lm_head`` does not apply: no LM head is run).
    """

    auto_model = AutoModelForSequenceClassification
    adapter_task = "SEQ_CLS"
    uses_lm_head = False
    predicts_scores = True  # the data module's predict batches are rows to score

    def __init__(self, *args: Any, center_rewards_coefficient: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.center_rewards_coefficient = center_rewards_coefficient

    def on_model_built(self) -> None:
        tok = self.tokenizer
        if tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id:
            # transformers pools at the last token that is not the pad id: here the token
            # before each sequence's final EOS, where this module reads the EOS itself
            rank_zero_warn(
                f"the pad token is the EOS token ({tok.pad_token!r}), which ends the sequences: "
                "this module scores at the last real token, but the export loaded with "
                "AutoModelForSequenceClassification would score at the token before it. Give "
                "the tokenizer a pad token of its own (e.g. Llama 3's <|finetune_right_pad_id|>) "
                "for an export that scores alike"
            )

    def config_overrides(self) -> dict[str, Any]:
        # the pad id lets the export's own pooling find each row's last real token
        return {"num_labels": 1, "pad_token_id": self.tokenizer.pad_token_id}

    @property
    def loss_divisor(self) -> float:
        return 1.0  # pair losses are O(1) already

    def sequence_scores(
        self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """The reward of each sequence of ``batch``: per row, or per packed sequence in the
        order of ``sequence_ids``."""
        model = self.model if model is None else model
        with captured_output(score_head(model)) as out:
            pooled = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, use_cache=False)
        per_position = out[0].squeeze(-1).float().flatten()  # (rows x length)
        scores = per_position[last_token_index(batch).to(per_position.device)]
        # FSDP2 gathers the root's weights for backward when the model's own output is used:
        # a zero share of it keeps the head's backward inside the sharder's hooks
        return scores + 0.0 * pooled.logits.float().sum()

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        chosen, rejected = self.sequence_scores(pair_inputs(batch)).chunk(2)
        pair_loss = bradley_terry_loss(
            chosen, rejected, batch.get("margin"), self.center_rewards_coefficient
        )
        w = self.loss_weights(batch, "loss_weight")
        if w is None:
            w = torch.ones_like(pair_loss)
        chosen, rejected = chosen.detach(), rejected.detach()
        per_pair = {
            "accuracy": (chosen > rejected).float(),
            "margin": chosen - rejected,
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
        }
        sums = {k: (v * w).sum() for k, v in per_pair.items()}
        return LossTerms((pair_loss * w).sum(), w.sum(), sums)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict]:
        """Rows of prompt, response and the response's score."""
        scores = self.sequence_scores(batch).tolist()
        return [
            {"prompt": prompt, "response": response, "score": score}
            for (prompt, response), score in zip(batch["rows"], scores, strict=True)
        ]


def last_token_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where each sequence ends, as indices into the flattened ``(rows, length)`` batch: the
    last position of each packed sequence (``sequence_ids``, padding -1), else each row's
    last position with attention (any padding side), else each row's last position."""
    rows, length = batch["input_ids"].shape
    positions = torch.arange(rows * length, device=batch["input_ids"].device)
    if "sequence_ids" in batch:
        ids = batch["sequence_ids"].flatten()
        real = ids >= 0
        last = torch.full((int(batch["sequence_count"]),), -1, device=ids.device)
        last = last.scatter_reduce(0, ids[real], positions[real], reduce="amax")
        if bool((last < 0).any()):
            raise ValueError("a packed sequence of this batch has no token")
        return last
    starts = positions[::length]
    if "attention_mask" not in batch:
        return starts + length - 1
    mask = batch["attention_mask"].to(positions.device)
    return starts + (torch.arange(length, device=mask.device) * mask).argmax(-1)


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps hidden states to scores (``score`` in transformers' classes)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(base).__name__} has no `score` head to read rewards from")
    return head


@contextmanager
def captured_output(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, what ``module`` returns is appended to the yielded list."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()
