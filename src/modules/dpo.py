"""Preference optimisation: DPO and its relatives, one ``loss_type`` key apart."""

from __future__ import annotations

from typing import Any, Literal

import torch

from src.errors import ConfigError
from src.modules import losses
from src.modules.base import LossTerms
from src.modules.pairs import pair_inputs
from src.modules.reference import Reference
from src.modules.referenced import ReferencedModule

LossType = Literal[tuple(losses.PREFERENCE_LOSSES)]  # the rows of the loss table
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class DPOModule(ReferencedModule):
    """Pairwise preference losses on chosen/rejected responses (``losses.PREFERENCE_LOSSES``).

    Chosen and rejected go through one concatenated forward. The reference (see
    ``reference.py``) is the policy with its adapters disabled under LoRA (no copy), a frozen
    copy of the initial policy, or ``ref_model_name_or_path``; it is kept out of checkpoints
    (its life cycle: ``referenced.py``). The loss of a step is the mean over its pairs.

    Args:
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``robust``, or the reference-free
            ``simpo`` and ``orpo``.
        beta: Strength of the preference term (the KL penalty for DPO).
        label_smoothing: Assumed share of flipped labels (``sigmoid``, ``robust``).
        gamma: SimPO's target margin.
        sft_weight: Weight of an added NLL term on the chosen responses (ORPO always has 1).
        ref_model_name_or_path: Reference model (default: a frozen copy of the initial policy).
        precompute_ref_logps: Compute the reference log-probabilities of every pair in one
            pass before training, store them with the prepared data (in the data cache,
            keyed by the reference's weights), and drop the reference: no reference model
            in memory while training.
        **kwargs: See ``CausalLMModule``.
    """

    reference_columns = REFERENCE_COLUMNS

    def __init__(
        self,
        *args: Any,
        loss_type: LossType = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        gamma: float = 0.5,
        sft_weight: float = 0.0,
        ref_model_name_or_path: str | None = None,
        precompute_ref_logps: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss_type not in losses.PREFERENCE_LOSSES:
            raise ConfigError(
                f"unknown loss_type {loss_type!r}: one of {', '.join(losses.PREFERENCE_LOSSES)}"
            )
        self.loss_type = loss_type
        self.objective = losses.PREFERENCE_LOSSES[loss_type]
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.gamma = gamma
        nll_weight = self.objective.nll_weight
        self.sft_weight = sft_weight if nll_weight is None else nll_weight
        self.ref_model_name_or_path = ref_model_name_or_path
        needed = self.objective.needs_reference
        self.reference = Reference(ref_model_name_or_path, precompute_ref_logps) if needed else None

    def scored_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Chosen then rejected, padded or packed: the reference's blocks as the policy's."""
        return pair_inputs(batch)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        inputs = pair_inputs(batch)
        logps, counts = self.label_logps(inputs).sequence_sums(inputs)
        counts = counts.clamp(min=1)
        means = logps / counts
        row = self.objective
        args = [*(means if row.per_token_mean else logps).chunk(2)]
        if row.needs_reference:
            ref = self.reference_logps(batch, inputs)
            args += (ref / counts if row.per_token_mean else ref).chunk(2)
        options = {name: getattr(self, name) for name in row.options}
        pair_loss, r_chosen, r_rejected = row.fn(*args, beta=self.beta, **options)
        mean_chosen = means.chunk(2)[0]
        if self.sft_weight:
            pair_loss = pair_loss - self.sft_weight * mean_chosen
        w = self.loss_weights(batch, "loss_weight")
        if w is None:
            w = torch.ones_like(pair_loss)
        chosen, rejected = logps.chunk(2)
        per_pair = {
            "rewards/chosen": r_chosen,
            "rewards/rejected": r_rejected,
            "rewards/accuracies": (r_chosen > r_rejected).float(),
            "rewards/margins": r_chosen - r_rejected,
            "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
        }
        sums = {k: (v * w).sum() for k, v in per_pair.items()}
        return LossTerms((pair_loss * w).sum(), w.sum(), sums)
