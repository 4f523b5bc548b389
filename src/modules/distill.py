"""Logit knowledge distillation: the student matches a frozen teacher's next-token
distribution at every label token, optionally mixed with the cross-entropy of the labels.

Neither model's full logits exist on the lean head path. The teacher runs its forward (no
gradients) with its head replaced, keeping only the label positions' hidden states and its
head weight (``head.label_logits``); the student's head then runs ``head.ChunkedMap``: a
chunk of student logits at a time, the teacher's logits of the same rows computed from the
kept hidden states, the per-token divergence and cross-entropy of the chunk, nothing kept
(backward recomputes the chunk). Under FSDP the teacher's head weight is whole only inside
its own forward: there the teacher's head computes its label positions' logits ``(N, V)``
inside that forward, in the teacher's dtype, and the chunks read those. (ZeRO-3 cannot hold
a separate teacher: ``Reference`` refuses it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from src.compat import attached_strategy, attached_trainer
from src.datamodules.tokenizer import load_tokenizer
from src.errors import ConfigError, PathNotFoundError
from src.local_paths import looks_local
from src.modules.base import CausalLMModule, LossTerms
from src.modules.head import LabelLogits, label_logits, label_map
from src.modules.losses import next_token_targets
from src.modules.reference import Reference
from src.strategies import parameters_are_sharded

DivergenceName = Literal["forward_kl", "reverse_kl", "jsd"]
TeacherDType = Literal["auto", "float32", "bfloat16"]
TEACHER_SETTING = "model.init_args.teacher_name_or_path"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
COLUMNS = ("divergence", "nll", "token_accuracy")  # what the chunk function returns per token


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: DivergenceName = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence ``(N,)`` of the student's next-token distribution from the
    teacher's, for logits ``(N, V_s)`` and ``(N, V_t)``, both divided by ``temperature``.

    ``forward_kl`` is KL(p_t || p_s), ``reverse_kl`` KL(p_s || p_t); ``jsd`` is GKD's generalised
    Jensen-Shannon divergence (Agarwal et al. 2023) with the mixture
    ``m = beta p_t + (1 - beta) p_s``: ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, which is
    the forward KL at ``beta = 0`` and the reverse KL at 1, as in TRL's ``GKDTrainer``. Heads
    padded to different row counts are compared over their common rows (every token of the
    shared tokenizer is among them).
    """
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = torch.log_softmax(student_logits[:, :vocab].float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits[:, :vocab].float() / temperature, dim=-1)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _kl(t, s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _kl(s, t)
    b = torch.tensor(beta, dtype=s.dtype, device=s.device)
    m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@dataclass(frozen=True)
class DistillTokens:
    """The chunk function (``head.ChunkFn``): for the student's logits of label tokens
    ``rows``, their divergence from the teacher's, cross-entropy, and argmax hit (``COLUMNS``)."""

    teacher: LabelLogits
    targets: torch.Tensor
    divergence: DivergenceName
    beta: float
    temperature: float

    def __call__(self, z: torch.Tensor, rows: slice) -> torch.Tensor:
        targets = self.targets[rows]
        teacher = self.teacher.rows(rows)
        div = token_divergence(z, teacher, self.divergence, self.beta, self.temperature)
        nll = torch.logsumexp(z, dim=-1) - z.gather(1, targets[:, None]).squeeze(1)
        correct = (z.argmax(-1) == targets).float()
        return torch.stack([div, nll, correct], dim=1)


class DistillationModule(CausalLMModule):
    """Logit distillation from a frozen teacher on SFT data: per label token,
    ``(1 - nll_weight) * divergence + nll_weight * cross-entropy``, averaged over every label
    token of an optimizer step (weighted by the examples' loss weights in training, when the
    data give any). Logs ``nll`` (comparable with an SFT run's ``loss``), ``divergence`` and
    ``token_accuracy``.

    The teacher is a ``Reference`` in mode ``separate``: frozen, in eval mode, without
    gradients, kept out of checkpoints and sharded like the student under FSDP. It must share
    the student's tokenizer (checked when the teacher's directory has one).

    Args:
        teacher_name_or_path: The teacher: a local directory or a hub id.
        divergence: ``forward_kl`` (KL(teacher || student), mode-covering), ``reverse_kl``
            (KL(student || teacher), mode-seeking) or ``jsd`` (generalised JSD with ``beta``).
        beta: The teacher's share of JSD's mixture (0: forward KL, 1: reverse KL).
        temperature: Both models' logits are divided by it in the divergence (no T^2 factor,
            as TRL); the cross-entropy uses the plain logits.
        nll_weight: Share of the labels' cross-entropy in each token's loss.
        teacher_dtype: The teacher's weight dtype: ``auto`` (the student's ``torch_dtype``),
            ``float32``, or ``bfloat16`` (half the memory; it is never trained).
        **kwargs: See ``CausalLMModule``.
    """

    def __init__(
        self,
        *args: Any,
        teacher_name_or_path: str,
        divergence: DivergenceName = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        nll_weight: float = 0.0,
        teacher_dtype: TeacherDType = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _check_settings(divergence, beta, temperature, nll_weight, teacher_dtype)
        self.teacher_name_or_path = teacher_name_or_path
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.nll_weight = nll_weight
        self.teacher_dtype = teacher_dtype
        self.teacher = Reference(
            teacher_name_or_path,
            setting=TEACHER_SETTING,
            dtype=None if teacher_dtype == "auto" else getattr(torch, teacher_dtype),
            zero3_advice="distil under fsdp, or deepspeed_zero2 (each rank holds the teacher)",
        )

    def on_model_built(self) -> None:
        """Check the teacher, then load it (in ``configure_model``: a config instantiates
        without the teacher, as DPO's does without its reference); ``predict`` generates
        with the student alone and needs no teacher."""
        trainer = attached_trainer(self)
        if trainer is not None and trainer.predicting:
            return
        _check_teacher_exists(self.teacher_name_or_path)
        check_same_tokenizer(
            self.tokenizer,
            self.tokenizer_name_or_path,
            self.teacher_name_or_path,
            self.trust_remote_code,
        )
        self.teacher.setup(self)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.on_fit_start()

    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> LabelLogits:
        """The teacher's logits at the label positions, served chunk by chunk."""
        strategy = attached_strategy(self)
        sharded = strategy is not None and parameters_are_sharded(strategy)
        with self.teacher.scoring() as teacher:
            return label_logits(teacher, batch, self.lm_head, logits_now=sharded)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        mask, targets = next_token_targets(batch["labels"])
        tokens = DistillTokens(
            self.teacher_logits(batch),
            targets,
            self.divergence,
            self.beta,
            self.temperature,
        )
        out = label_map(
            self.model, batch, tokens, len(COLUMNS), self.lm_head, self.lm_head_chunk_size
        )
        divergence, nll, correct = out.unbind(1)
        loss = (1 - self.nll_weight) * divergence + self.nll_weight * nll
        weights = self.loss_weights(batch)
        w = torch.ones_like(loss) if weights is None else weights[:, 1:][mask].float()
        per_token = (divergence, nll, correct)
        sums = {name: (v * w).sum() for name, v in zip(COLUMNS, per_token, strict=True)}
        count = mask.sum() if weights is None else w.sum()
        return LossTerms((loss * w).sum(), count, sums)


def _check_settings(
    divergence: str, beta: float, temperature: float, nll_weight: float, teacher_dtype: str
) -> None:
    if divergence not in DivergenceName.__args__:
        raise ConfigError(
            f"unknown divergence {divergence!r}: one of {', '.join(DivergenceName.__args__)}"
        )
    if teacher_dtype not in TeacherDType.__args__:
        raise ConfigError(
            f"unknown teacher_dtype {teacher_dtype!r}: one of {', '.join(TeacherDType.__args__)}"
        )
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta is the teacher's share of JSD's mixture, in [0, 1]; got {beta}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= nll_weight <= 1.0:
        raise ConfigError(f"nll_weight is a share of each token's loss, in [0, 1]: {nll_weight}")


def _check_teacher_exists(name_or_path: str) -> None:
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise PathNotFoundError(
            f"teacher not found: {name_or_path} ({TEACHER_SETTING}): no such directory. Train "
            "or export a teacher first; the demo's teacher is the SFT demo's export, written "
            "by: python train.py fit --config configs/sft.yaml"
        )


def check_same_tokenizer(
    student: PreTrainedTokenizerBase,
    student_path: str,
    teacher_path: str,
    trust_remote_code: bool = False,
) -> None:
    """A ``ConfigError`` naming both paths when the teacher's tokenizer (if its directory, or
    its hub repository, has one) differs from the student's in vocabulary or special tokens:
    the divergence compares the two distributions token id by token id."""
    teacher = _teacher_tokenizer(teacher_path, trust_remote_code)
    if teacher is None:
        return
    problems = tokenizer_differences(student, teacher)
    if problems:
        raise ConfigError(
            f"the teacher's tokenizer ({teacher_path}) differs from the student's "
            f"({student_path}): {'; '.join(problems)}. Logit distillation compares the two "
            "models token id by token id: distil from a teacher with the student's tokenizer"
        )


def tokenizer_differences(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase
) -> list[str]:
    """How two tokenizers differ in vocabulary (token -> id) and special tokens."""
    problems = []
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    if ours != theirs:
        only_ours = len(ours.keys() - theirs.keys())
        differ = sum(ours.get(token) != i for token, i in theirs.items()) + only_ours
        problems.append(f"{differ} tokens differ (vocabularies of {len(ours)} and {len(theirs)})")
    ours, theirs = _special_tokens(student), _special_tokens(teacher)
    if ours != theirs:
        changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        shown = ", ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in changed)
        problems.append(f"special tokens differ ({shown})")
    return problems


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    named = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    return named | {"special": sorted(tokenizer.all_special_tokens)}  # the additional ones too


def _teacher_tokenizer(path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase | None:
    local = Path(path).expanduser()
    if local.is_dir():
        has_one = any((local / name).is_file() for name in TOKENIZER_FILES)
        return load_tokenizer(str(local), trust_remote_code) if has_one else None
    try:  # a hub id: its repository may hold no tokenizer
        return load_tokenizer(path, trust_remote_code)
    except OSError:
        return None
