"""Preference optimisation: DPO and its relatives, one ``loss_type`` key apart."""

from __future__ import annotations

from typing import Any, Literal

import torch

from src.errors import ConfigError
from src.modules import losses
from src.modules.base import CausalLMModule, LossTerms
from src.modules.pairs import pair_inputs
from src.modules.reference import Reference, Scores
from src.strategies import call_outside_step

LossType = Literal[tuple(losses.PREFERENCE_LOSSES)]  # the rows of the loss table
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class DPOModule(CausalLMModule):
    """Pairwise preference losses on chosen/rejected responses (``losses.PREFERENCE_LOSSES``).

    Chosen and rejected go through one concatenated forward. The reference (see
    ``reference.py``) is the policy with its adapters disabled under LoRA (no copy), a frozen
    copy of the initial policy, or ``ref_model_name_or_path``; it is kept out of checkpoints.
    The loss of a step is the mean over its pairs.

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

    @property
    def loss_divisor(self) -> float:
        return 1.0  # pair losses are O(1) already

    def on_model_built(self) -> None:
        if self.reference is not None:
            self.reference.setup(self)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.reference is None:
            return
        self.reference.on_fit_start()
        if self.reference.precompute:
            self.precompute_reference(self.trainer.datamodule)

    def precompute_reference(self, datamodule: Any) -> None:
        """Reference log-probs of every pair as columns of the data, then no reference model."""
        self.reference.precompute_scores(datamodule, REFERENCE_COLUMNS, self._reference_columns)

    def _reference_columns(self, batch: dict[str, torch.Tensor]) -> Scores:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        chosen, rejected = call_outside_step(self, "reference_logps", batch).chunk(2)
        if "row_pairs" in batch:  # packed: a list per row, its pairs' values
            split = batch["row_pairs"].tolist()
            chosen, rejected = list(chosen.split(split)), list(rejected.split(split))
        return dict(zip(REFERENCE_COLUMNS, (chosen, rejected), strict=True))

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-probabilities of chosen then rejected under the reference."""
        if REFERENCE_COLUMNS[0] in batch:
            return torch.cat([batch[key] for key in REFERENCE_COLUMNS])
        return self.reference.logps(pair_inputs(batch))

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        inputs = pair_inputs(batch)
        logps, counts = self.label_logps(inputs).sequence_sums(inputs)
        counts = counts.clamp(min=1)
        means = logps / counts
        row = self.objective
        args = [*(means if row.per_token_mean else logps).chunk(2)]
        if row.needs_reference:
            ref = self.reference_logps(batch)
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
