"""Losses as pure functions of logits and labels, and of per-sequence log-probabilities."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over the label tokens (labels != -100).

    ``logits[:, t]`` predicts ``labels[:, t + 1]``, the Hugging Face convention. Returns the
    summed loss, the number of label tokens and the number predicted right (argmax), so the
    caller can take the mean over every token of an optimizer step rather than a mean of means.
    With ``weights`` (shaped like ``labels``), each token counts its weight in all three:
    ``sum(w * ce)``, ``sum(w)`` and ``sum(w * right)``, whose ratio is the weighted mean.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits[:, :-1][mask].float()
    targets = targets[mask]
    if weights is None:
        loss_sum = F.cross_entropy(
            picked, targets, reduction="sum", label_smoothing=label_smoothing
        )
        correct = (picked.argmax(dim=-1) == targets).sum()
        return loss_sum, mask.sum(), correct
    w = weights[:, 1:][mask].float()
    losses = F.cross_entropy(picked, targets, reduction="none", label_smoothing=label_smoothing)
    right = (picked.argmax(dim=-1) == targets).float()
    return (losses * w).sum(), w.sum(), (right * w).sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of the label tokens' log-probabilities, and their count.

    Same shift and mask as ``token_cross_entropy``, so policy and reference agree.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logprobs, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


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
