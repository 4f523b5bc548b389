"""Unpaired preference optimisation: KTO and APO-zero, one ``loss_type`` key apart."""

from __future__ import annotations

from typing import Any, Literal

import torch

from src.compat import attached_trainer
from src.errors import ConfigError
from src.modules import losses
from src.modules.base import LossTerms
from src.modules.reference import Reference
from src.modules.referenced import ReferencedModule

LossType = Literal[losses.UNPAIRED_LOSSES]
REFERENCE_COLUMNS = ("ref_logps", "ref_kl_logps")
SEQUENCES = ("", "kl_")  # a batch's matched rows, then its mismatched KL rows
INPUTS = ("input_ids", "attention_mask", "labels")


class KTOModule(ReferencedModule):
    """Kahneman-Tversky optimisation (Ethayarajh et al., 2024, arXiv:2402.01306) on
    completions labelled desirable or not (``UnpairedPreferenceDataModule``).

    A row's implied reward is its completion's summed log-probability under the policy minus
    under the reference (see ``reference.py``: adapters off under LoRA, a frozen copy, a
    separate model, or precomputed). KTO's reference point is the KL estimate: the mean over
    the batch's mismatched pairs (each prompt with another row's completion) of the same
    log-ratio, over every device, without gradient, clamped at 0 (as TRL). The policy runs the
    mismatched rows without autograd (the estimate carries no gradient, so no activations are
    kept for them); the reference runs both in one forward. The loss of a step is the mean over
    its rows; ``rewards/chosen`` is averaged over the desirable rows only and
    ``rewards/rejected`` over the undesirable ones, and ``kl`` is the estimate each row saw.

    Args:
        loss_type: ``kto``, or ``apo_zero_unpaired`` (no KL term: the mismatched rows are not
            run).
        beta: Scale of the implied rewards (the strength of the KL penalty).
        desirable_weight: Weight of a desirable row's loss (``lambda_D``). The paper keeps
            ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` in
            [1, 4/3].
        undesirable_weight: Weight of an undesirable row's loss (``lambda_U``).
        ref_model_name_or_path: Reference model (default: a frozen copy of the initial policy).
        precompute_ref_logps: Compute the reference log-probabilities of every row and of
            its KL sequence in one pass before training, store them with the prepared data,
            and drop the reference (see ``DPOModule``).
        **kwargs: See ``CausalLMModule``.
    """

    reference_columns = REFERENCE_COLUMNS

    def __init__(
        self,
        *args: Any,
        loss_type: LossType = "kto",
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        ref_model_name_or_path: str | None = None,
        precompute_ref_logps: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss_type not in losses.UNPAIRED_LOSSES:
            raise ConfigError(
                f"unknown loss_type {loss_type!r}: one of {', '.join(losses.UNPAIRED_LOSSES)}"
            )
        if min(desirable_weight, undesirable_weight) < 0:
            raise ConfigError(
                "desirable_weight and undesirable_weight must be >= 0, got "
                f"{desirable_weight} and {undesirable_weight}"
            )
        self.loss_type = loss_type
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.ref_model_name_or_path = ref_model_name_or_path
        self.reference = Reference(ref_model_name_or_path, precompute_ref_logps)

    @property
    def uses_kl(self) -> bool:
        return self.loss_type == "kto"

    def scored_inputs(
        self, batch: dict[str, torch.Tensor], with_kl: bool = True
    ) -> dict[str, torch.Tensor]:
        """The matched rows, then (``with_kl``) their KL rows, as one batch."""
        sequences = SEQUENCES if with_kl else SEQUENCES[:1]
        return {key: torch.cat([batch[s + key] for s in sequences]) for key in INPUTS}

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        matched = self.scored_inputs(batch, with_kl=False)
        logps = self.label_logps(matched).sequence_sums(matched)[0]
        rows = len(logps)
        # the reference scores both blocks in one forward (precomputed: both columns)
        ref = self.reference_logps(batch, self.scored_inputs(batch, self.uses_kl))
        desirable = batch["label"] > 0.5
        weights = (self.beta, self.desirable_weight, self.undesirable_weight)
        args = (logps, ref[:rows], desirable)
        if self.uses_kl:
            kl_rows = {key: batch[SEQUENCES[1] + key] for key in INPUTS}
            with torch.no_grad():  # the estimate carries no gradient: keep no activations
                kl_logps = self.label_logps(kl_rows).sequence_sums(kl_rows)[0]
            kl = self.kl_estimate(kl_logps, ref[rows:])
            loss, rewards = losses.kto_loss(*args, kl, *weights)
        else:
            loss, rewards = losses.apo_zero_unpaired_loss(*args, *weights)
        w = self.loss_weights(batch, "loss_weight")
        if w is None:
            w = torch.ones_like(loss)
        chosen, rejected = w * desirable, w * ~desirable
        sums = {
            "rewards/chosen": (rewards * chosen).sum(),
            "rewards/rejected": (rewards * rejected).sum(),
            "logps/chosen": (logps.detach() * chosen).sum(),
            "logps/rejected": (logps.detach() * rejected).sum(),
        }
        n_chosen, n_rejected = chosen.sum(), rejected.sum()
        counts = {
            "rewards/chosen": n_chosen,
            "rewards/rejected": n_rejected,
            "logps/chosen": n_chosen,
            "logps/rejected": n_rejected,
        }
        if self.uses_kl:
            sums["kl"] = kl * w.sum()  # the estimate every row of the batch was measured by
        return LossTerms((loss * w).sum(), w.sum(), sums, counts)

    def kl_estimate(self, kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
        """KTO's reference point: the mean log-ratio of policy to reference over the
        mismatched pairs of every device (their sum and count all-reduced), detached and
        clamped at 0. Every rank calls it once per batch, in training and evaluation."""
        total = (kl_logps - ref_kl_logps).detach().float().sum()
        totals = torch.stack([total, total.new_tensor(float(kl_logps.numel()))])
        trainer = attached_trainer(self)
        if trainer is not None and trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        return (totals[0] / totals[1].clamp(min=1)).clamp(min=0)
