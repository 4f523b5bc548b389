"""Preference optimisation: DPO and its relatives, one ``loss_type`` key apart."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import uuid
from typing import Any, Literal

import datasets
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info

from src.modules import losses
from src.modules.base import CausalLMModule, LossTerms, logits_of
from src.strategies import (
    call_outside_step,
    is_fsdp,
    model_key,
    parameters_are_sharded,
    shard_like_policy,
    zero_stage,
)

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"]


class DPOModule(CausalLMModule):
    """Pairwise preference losses on chosen/rejected responses (see ``losses.py``).

    Chosen and rejected go through one concatenated forward. The reference is the policy
    with its adapters disabled under LoRA (no copy), a frozen copy of the initial policy, or
    ``ref_model_name_or_path``; it is kept out of checkpoints. The loss of a step is the mean
    over its pairs.

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
        self.loss_type = loss_type
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.gamma = gamma
        self.sft_weight = 1.0 if loss_type == "orpo" else sft_weight
        self.ref_model_name_or_path = ref_model_name_or_path
        self.precompute_ref_logps = precompute_ref_logps
        self.__dict__["_reference"] = None  # not a submodule: never checkpointed or trained
        self._initial_digest = ""

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in losses.REFERENCE_FREE

    @property
    def loss_divisor(self) -> float:
        return 1.0  # pair losses are O(1) already

    def configure_model(self) -> None:
        super().configure_model()
        strategy = self._strategy
        if not self.needs_reference or self.lora is not None or self._reference is not None:
            return
        if strategy is not None and zero_stage(strategy) == 3 and not self._policy_is_reference:
            raise ValueError(
                "under DeepSpeed ZeRO-3 no separate reference model can be built: set "
                "model.precompute_ref_logps true (the initial policy scores the pairs before "
                "training), use LoRA (the reference is the policy without adapters), or fsdp"
            )
        if self._policy_is_reference:  # the initial policy scores the pairs: no copy at all
            # fingerprinted now, before a resumed fit restores trained weights into it
            self._initial_digest = _weights_digest(self.model, strategy)
            return
        if self.ref_model_name_or_path:
            reference = self.load_model(self.ref_model_name_or_path)
        else:
            reference = copy.deepcopy(self.model)
        reference.eval().requires_grad_(False)
        self.__dict__["_reference"] = reference

    @property
    def _strategy(self) -> Strategy | None:
        return self._trainer.strategy if self._trainer is not None else None

    @property
    def _policy_is_reference(self) -> bool:
        """Precomputed log-probs of the initial policy need no copy; under FSDP the policy's
        root shards are only gathered inside a step, so there the copy is kept (and sharded)."""
        strategy = self._strategy
        return (
            self.precompute_ref_logps
            and not self.ref_model_name_or_path
            and not (strategy is not None and is_fsdp(strategy))
        )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        strategy = self.trainer.strategy
        if self._reference is not None and is_fsdp(strategy):
            self.__dict__["_reference"] = shard_like_policy(strategy, self._reference)
        if self.precompute_ref_logps and self.needs_reference:
            self._precompute(self.trainer.datamodule)

    def _precompute(self, datamodule: Any) -> None:
        """Reference log-probs as dataset columns (before the loaders exist), then no reference."""
        if self._reference is None and self.lora is None:
            digest = self._initial_digest
        else:
            scorer = self._reference if self._reference is not None else self.model
            digest = _weights_digest(scorer, self._strategy)
        store = datamodule.cache_path / f"ref_logps-{digest}" if datamodule.cache_path else None
        resuming = self._trainer is not None and self.trainer.ckpt_path is not None
        if resuming and self._reference is None and self.lora is None:
            missing = [
                split
                for split, data in datamodule.datasets.items()
                if len(data)
                and "ref_chosen_logps" not in data.column_names
                and (store is None or not (store / split).exists())
            ]
            if missing:
                raise ValueError(
                    "this resumed fit needs the reference log-probs its first run computed "
                    "from the initial weights, and they are no longer in the data cache: set "
                    "model.ref_model_name_or_path to the initial model to compute them again"
                )
        for split, data in list(datamodule.datasets.items()):
            if len(data) == 0 or "ref_chosen_logps" in data.column_names:
                continue
            if store is not None and (store / split).exists():
                datamodule.datasets[split] = datasets.load_from_disk(str(store / split))
                continue
            collate = datamodule.collator()
            values: list[torch.Tensor] = []
            size = datamodule.val_batch_size
            every = max(1, -(-len(data) // size) // 10)  # about ten lines a split, in any log
            for n, start in enumerate(range(0, len(data), size)):
                rows = [data[i] for i in range(start, min(start + size, len(data)))]
                batch = {k: v.to(self.device) for k, v in collate(rows).items()}
                values.append(call_outside_step(self, "reference_logps", batch).cpu())
                done, total = start + len(rows), len(data)
                if (n + 1) % every == 0 or done == total:
                    rank_zero_info(f"[dpo] reference log-probs of {split}: {done}/{total} pairs")
            chosen, rejected = zip(*(v.chunk(2) for v in values), strict=True)
            data = data.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
            data = data.add_column("ref_rejected_logps", torch.cat(rejected).tolist())
            if store is not None:  # written aside, then renamed: ranks may race
                tmp = store / f"{split}.tmp-{uuid.uuid4().hex[:8]}"
                data.save_to_disk(str(tmp))
                try:
                    os.rename(tmp, store / split)
                except OSError:
                    shutil.rmtree(tmp, ignore_errors=True)
                data = datasets.load_from_disk(str(store / split))
            datamodule.datasets[split] = data
        rank_zero_info("[dpo] reference log-probabilities precomputed; reference model released")
        self.__dict__["_reference"] = None

    def reference(self) -> torch.nn.Module:
        ref = self._reference
        if next(ref.parameters()).device != self.device:
            ref.to(self.device)
        return ref

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-probabilities of chosen then rejected under the reference."""
        if "ref_chosen_logps" in batch:
            return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        inputs = _concatenated(batch)
        if self.lora is not None:
            with self.model.disable_adapter():
                logits = logits_of(self.model, inputs)
        elif self._reference is None:  # precomputing with the initial policy itself
            was_training = self.model.training
            self.model.eval()
            logits = logits_of(self.model, inputs)
            self.model.train(was_training)
        else:
            logits = logits_of(self.reference(), inputs)
        return losses.sequence_logps(logits, inputs["labels"])[0]

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        inputs = _concatenated(batch)
        logps, counts = losses.sequence_logps(self(inputs), inputs["labels"])
        counts = counts.clamp(min=1)
        chosen, rejected = logps.chunk(2)
        means = logps / counts
        mean_chosen, mean_rejected = means.chunk(2)
        if self.loss_type in ("simpo", "orpo"):
            fn = losses.simpo_loss if self.loss_type == "simpo" else losses.orpo_loss
            extra = {"gamma": self.gamma} if self.loss_type == "simpo" else {}
            pair_loss, r_chosen, r_rejected = fn(mean_chosen, mean_rejected, self.beta, **extra)
        else:
            ref = self.reference_logps(batch)
            policy = (mean_chosen, mean_rejected) if self.loss_type == "ipo" else (chosen, rejected)
            if self.loss_type == "ipo":
                ref = ref / counts
            ref_chosen, ref_rejected = ref.chunk(2)
            kwargs = (
                {"label_smoothing": self.label_smoothing}
                if self.loss_type in ("sigmoid", "robust")
                else {}
            )
            fn = getattr(losses, f"{self.loss_type}_loss")
            pair_loss, r_chosen, r_rejected = fn(
                *policy, ref_chosen, ref_rejected, beta=self.beta, **kwargs
            )
        if self.sft_weight:
            pair_loss = pair_loss - self.sft_weight * mean_chosen
        w = self.loss_weights(batch, "loss_weight")
        if w is None:
            w = torch.ones_like(pair_loss)
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


def _weights_digest(model: torch.nn.Module, strategy: Strategy | None) -> str:
    """A fingerprint of the reference weights (per tensor: size, sum, sum of squares).

    Under FSDP and ZeRO-3 each rank sees only its shard: the statistics are summed over the
    ranks, so every rank computes the same digest.
    """
    names, stats = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # the reference is the base model without its adapters
                continue
            x = getattr(p, "ds_tensor", p).detach().double()
            names.append(model_key(name))
            stats.append(torch.stack([torch.tensor(x.numel()).double(), x.sum(), (x * x).sum()]))
    table = torch.stack(stats).to(next(model.parameters()).device)
    if strategy is not None and parameters_are_sharded(strategy):
        table = strategy.reduce(table, reduce_op="sum")
    digest = hashlib.sha256()
    for name, (n, total, squares) in zip(names, table.tolist(), strict=True):
        digest.update(f"{name}:{int(n)}:{total:.12e}:{squares:.12e}".encode())
    return digest.hexdigest()[:20]


def _concatenated(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows as one batch (the collator pads both to one width)."""
    return {
        key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
        for key in ("input_ids", "attention_mask", "labels")
    }
