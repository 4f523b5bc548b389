"""Losses as pure functions: of the label tokens' log-probabilities (``LabelLogps``, which the
head gives, see ``head.py``), and of per-sequence log-probabilities."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LabelLogps:
    """What the objectives need from the head, one value per label token.

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (the Hugging Face convention); the label
    tokens are the positions of ``mask`` (``labels[:, 1:] != -100``), in row-major order.

    Attributes:
        logp: Log-probability of each label token (float32, differentiable), shape ``(N,)``.
        mean_logp: Mean log-probability over the vocabulary at each label position (what
            label smoothing needs), or None when not computed.
        correct: Whether the argmax is the label, ``(N,)``.
        mask: ``(B, T - 1)``: which next-token positions are labels.
    """

    logp: torch.Tensor
    mean_logp: torch.Tensor | None
    correct: torch.Tensor
    mask: torch.Tensor

    def at_labels(self, values: torch.Tensor) -> torch.Tensor:
        """A per-position tensor ``(B, T)`` (weights, segment ids) at the label tokens."""
        return values[:, 1:][self.mask.to(values.device)]

    def nll(self, label_smoothing: float = 0.0) -> torch.Tensor:
        """Per-token cross-entropy, with label smoothing as ``F.cross_entropy`` defines it."""
        if not label_smoothing:
            return -self.logp
        if self.mean_logp is None:
            raise ValueError("label smoothing needs the mean log-probabilities: smoothing=True")
        return -(1 - label_smoothing) * self.logp - label_smoothing * self.mean_logp

    def sums_by(self, index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability sums and label counts per group, for a group index per token."""
        sums = self.logp.new_zeros(size).index_add(0, index, self.logp)
        counts = torch.zeros(size, dtype=torch.long, device=index.device)
        return sums, counts.index_add(0, index, torch.ones_like(index))

    def sequence_sums(
        self, batch: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability sums and label counts per sequence: per row of the batch, or per
        packed sequence when ``batch`` numbers them (``sequence_ids``, ``sequence_count``)."""
        if batch is not None and "sequence_ids" in batch:
            index = self.at_labels(batch["sequence_ids"]).to(self.logp.device)
            return self.sums_by(index, int(batch["sequence_count"]))
        rows = self.mask.nonzero()[:, 0].to(self.logp.device)
        return self.sums_by(rows, self.mask.shape[0])


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The label mask over next-token positions and the label tokens it selects."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


def label_logps_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: bool = False
) -> LabelLogps:
    """``LabelLogps`` from full logits ``(B, T, V)``, reduced in float32."""
    mask, targets = next_token_targets(labels)
    logprobs = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)
    mean = logprobs.mean(-1) if smoothing else None
    return LabelLogps(logp, mean, logprobs.argmax(-1) == targets, mask)


def token_sums(
    lp: LabelLogps, label_smoothing: float = 0.0, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The summed cross-entropy over the label tokens, their number, and the number predicted
    right (argmax), so the caller can take the mean over every token of an optimizer step
    rather than a mean of means. With ``weights`` (shaped like the labels), each token counts
    its weight in all three: ``sum(w * ce)``, ``sum(w)`` and ``sum(w * right)``."""
    losses = lp.nll(label_smoothing)
    if weights is None:
        return losses.sum(), lp.mask.sum(), lp.correct.sum()
    w = lp.at_labels(weights).float()
    return (losses * w).sum(), w.sum(), (lp.correct.float() * w).sum()


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_sums`` from full logits (``B, T, V``)."""
    return token_sums(
        label_logps_from_logits(logits, labels, bool(label_smoothing)), label_smoothing, weights
    )


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of the label tokens' log-probabilities, and their count, from full
    logits; the same shift and mask as ``token_cross_entropy``, so policy and reference agree."""
    return label_logps_from_logits(logits, labels).sequence_sums()


# ---------------------------------------------------------------- preference losses
# Each takes per-pair log-probabilities (summed over the response tokens unless stated) and
# returns (loss per pair, chosen reward, rejected reward). ``h`` below is the margin of the
# policy over the reference: (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).


def _margin(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return chosen - ref_chosen, rejected - ref_rejected


def sigmoid_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al., 2023, arXiv:2305.18290): ``-log sigmoid(beta * h)``.

    With ``label_smoothing`` eps (conservative DPO, Mitchell 2023): preferences are assumed
    flipped with probability eps, ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    """
    c, r = _margin(chosen, rejected, ref_chosen, ref_rejected)
    h = beta * (c - r)
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return loss, beta * c.detach(), beta * r.detach()


def robust_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Robust DPO (Chowdhury et al., 2024, arXiv:2403.00409), unbiased under label noise eps:
    ``(-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)``."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {label_smoothing}")
    c, r = _margin(chosen, rejected, ref_chosen, ref_rejected)
    h = beta * (c - r)
    loss = (-(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (
        1 - 2 * label_smoothing
    )
    return loss, beta * c.detach(), beta * r.detach()


def hinge_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLiC hinge (Zhao et al., 2023, arXiv:2305.10425): ``max(0, 1 - beta * h)``."""
    c, r = _margin(chosen, rejected, ref_chosen, ref_rejected)
    return torch.relu(1 - beta * (c - r)), beta * c.detach(), beta * r.detach()


def ipo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al., 2023, arXiv:2310.12036): ``(h - 1 / (2 beta))^2``.

    Pass per-token *mean* log-probabilities (the DPO module does), as TRL does.
    """
    c, r = _margin(chosen, rejected, ref_chosen, ref_rejected)
    return (c - r - 1 / (2 * beta)) ** 2, beta * c.detach(), beta * r.detach()


def simpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 2.0, gamma: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al., 2024, arXiv:2405.14734), reference-free on per-token *mean*
    log-probabilities: ``-log sigmoid(beta * (mean log pi(y_w) - mean log pi(y_l)) - gamma)``."""
    loss = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def orpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al., 2024, arXiv:2403.07691) on per-token *mean*
    log-probabilities: ``-beta * log sigmoid(log odds(y_w) - log odds(y_l))`` with
    ``log odds(y) = log p - log(1 - p)``. The NLL on chosen is added by the caller."""
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return -beta * F.logsigmoid(log_odds), beta * chosen.detach(), beta * rejected.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (Maechler, 2012)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass(frozen=True)
class PreferenceLoss:
    """A row of the loss table: how the DPO module calls one loss function.

    Attributes:
        fn: ``fn(chosen, rejected[, ref_chosen, ref_rejected], beta=..., **options)`` returning
            (loss per pair, chosen reward, rejected reward).
        needs_reference: Whether ``fn`` takes the reference's log-probabilities.
        per_token_mean: Whether log-probabilities are passed as per-token means (else sums).
        options: Further settings of the module passed to ``fn`` by name.
        nll_weight: A fixed weight of the NLL on chosen that the loss includes (ORPO), else
            None and the module's ``sft_weight`` applies.
    """

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    needs_reference: bool = True
    per_token_mean: bool = False
    options: tuple[str, ...] = ()
    nll_weight: float | None = None


# ``loss_type`` -> its row; a new loss is one function above and one row here
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(sigmoid_loss, options=("label_smoothing",)),
    "ipo": PreferenceLoss(ipo_loss, per_token_mean=True),
    "hinge": PreferenceLoss(hinge_loss),
    "robust": PreferenceLoss(robust_loss, options=("label_smoothing",)),
    "simpo": PreferenceLoss(
        simpo_loss, needs_reference=False, per_token_mean=True, options=("gamma",)
    ),
    "orpo": PreferenceLoss(orpo_loss, needs_reference=False, per_token_mean=True, nll_weight=1.0),
}


# ------------------------------------------------------------------ reward models


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> torch.Tensor:
    """A reward model's loss per pair on its scalar rewards (Bradley and Terry, 1952):
    ``-log sigmoid(r_w - r_l - margin)``, with a margin per pair as Llama 2's (Touvron et al.,
    2023, arXiv:2307.09288), plus ``c * (r_w + r_l)^2`` which keeps rewards centred on 0
    (Eisenstein et al., 2023, arXiv:2312.09244; TRL's ``center_rewards_coefficient``)."""
    gap = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(gap)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen + rejected) ** 2
    return loss


# ------------------------------------------------------- unpaired preference losses (KTO)
# Each takes per-row log-probabilities summed over the completion, policy and reference, and
# whether each completion is desirable; it returns (loss per row, reward per row).

UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired")  # the KTO module's loss_type


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al., 2024, arXiv:2402.01306, eq. 7): with the implied reward
    ``r = log pi(y|x) - log ref(y|x)`` and the reference point ``z`` (the KL estimate, no
    gradient), ``w_d (1 - sigmoid(beta (r - z)))`` for a desirable completion and
    ``w_u (1 - sigmoid(beta (z - r)))`` for an undesirable one. Rewards are ``beta * r``."""
    r = logps - ref_logps
    h = beta * (r - kl)
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(h)),
        undesirable_weight * (1 - torch.sigmoid(-h)),
    )
    return loss, beta * r.detach()


def apo_zero_unpaired_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APO-zero, unpaired (D'Oosterlinck et al., 2024, arXiv:2408.06266): KTO with the
    reference point at 0, which raises desirable rewards and lowers undesirable ones for
    data better than the model's own outputs (no KL estimate needed)."""
    return kto_loss(logps, ref_logps, desirable, 0.0, beta, desirable_weight, undesirable_weight)
