"""The model a policy is measured against: DPO's reference (and KTO's, or a frozen teacher).

Its mode is chosen once, when the model is configured, from the settings and the strategy:

- ``separate``: another model (``name_or_path``), frozen;
- ``adapters_off``: under LoRA, the policy with its adapters disabled (no copy);
- ``initial_policy``: with ``precompute``, the policy itself scores the data before the first
  step (no copy; not under FSDP, whose root shards are only gathered inside a step);
- ``frozen_copy``: a frozen copy of the initial policy.

A separate model or a copy is sharded like the policy under FSDP, and kept out of
checkpoints (it is no submodule). With ``precompute`` the scores are computed once before
training, stored with the prepared data, and the model is released.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info

from src.compat import attached_strategy, attached_trainer
from src.errors import ConfigError
from src.modules.base import CausalLMModule
from src.strategies import (
    is_fsdp,
    is_fsdp2,
    local_part,
    model_key,
    parameters_are_sharded,
    shard_like_policy,
    zero_stage,
)

Mode = Literal["separate", "adapters_off", "initial_policy", "frozen_copy"]
ZERO3_REFERENCE_ADVICE = (
    "set model.precompute_ref_logps true (the initial policy scores the pairs before "
    "training), use LoRA (the reference is the policy without adapters), or fsdp"
)
# column name -> one value per row of a batch (a tensor), or a tensor of values per row
Scores = dict[str, torch.Tensor | list[torch.Tensor]]


def choose_mode(name_or_path: str | None, lora: bool, precompute: bool, fsdp: bool) -> Mode:
    """The reference a configuration asks for (the module docstring lists the modes)."""
    if name_or_path:
        return "separate"
    if lora:
        return "adapters_off"
    if precompute and not fsdp:
        return "initial_policy"
    return "frozen_copy"


class Reference:
    """A frozen scorer for a policy module; ``setup`` binds it and chooses its mode.

    Args:
        name_or_path: A separate model to load (default: the initial policy).
        precompute: Score the data before training and release the model.
        setting: The config key of ``name_or_path``, for messages.
        dtype: The separate model's weight dtype (default: the policy's ``torch_dtype``); a
            frozen model needs no float32 master weights, so ``bfloat16`` halves its memory.
        zero3_advice: What to do instead under ZeRO-3, where no separate model can be built.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        precompute: bool = False,
        setting: str = "model.init_args.ref_model_name_or_path",
        dtype: torch.dtype | None = None,
        zero3_advice: str = ZERO3_REFERENCE_ADVICE,
    ) -> None:
        self.name_or_path = name_or_path
        self.precompute = precompute
        self.setting = setting
        self.dtype = dtype
        self.zero3_advice = zero3_advice
        self.mode: Mode | None = None
        self.model: torch.nn.Module | None = None  # a separate model or a copy
        self._policy: CausalLMModule | None = None
        self._initial_digest = ""
        self._precomputing = False
        self._released = False

    # ------------------------------------------------------------------ life cycle
    def setup(self, policy: CausalLMModule) -> None:
        """Choose the mode and build what it needs; in ``configure_model``, once."""
        if self.mode is not None:
            return
        strategy = _strategy(policy)
        fsdp = strategy is not None and is_fsdp(strategy)
        mode = choose_mode(self.name_or_path, policy.lora is not None, self.precompute, fsdp)
        if mode in ("separate", "frozen_copy") and strategy and zero_stage(strategy) == 3:
            raise ConfigError(
                f"under DeepSpeed ZeRO-3 no separate model for {self.setting} can be built: "
                + self.zero3_advice
            )
        self.mode, self._policy = mode, policy
        if mode == "initial_policy":
            # fingerprinted now, before a resumed fit restores trained weights into it
            self._initial_digest = weights_digest(policy.model, strategy)
        elif mode == "frozen_copy":
            self.model = _frozen(copy.deepcopy(policy.model))
        elif mode == "separate":
            self.model = _frozen(policy.load_model(self.name_or_path, dtype=self.dtype))

    def on_fit_start(self) -> None:
        """Shard a separate model or a copy like the policy (FSDP1, FSDP2)."""
        strategy = _strategy(self._policy)
        if self.model is None or strategy is None:
            return
        if is_fsdp(strategy):
            self.model = shard_like_policy(strategy, self.model)
        elif is_fsdp2(strategy):
            self.model = strategy.shard(self.model, trainable=False).to(strategy.root_device)

    def release(self) -> None:
        self.model = None
        self._released = True

    # ------------------------------------------------------------------- scoring
    @contextmanager
    def scoring(self) -> Iterator[torch.nn.Module]:
        """The model to run for reference scores: frozen, in eval mode, without gradients."""
        policy = self._bound()
        with torch.no_grad():
            if self.model is not None:
                if next(self.model.parameters()).device != policy.device:
                    self.model.to(policy.device)
                yield self.model
            elif self.mode == "adapters_off":
                with _eval(policy.model), policy.model.disable_adapter():
                    yield policy.model
            elif self.mode == "initial_policy" and self._initial_weights(policy):
                with _eval(policy.model):
                    yield policy.model
            else:
                raise RuntimeError(
                    "the reference scores were precomputed for training and the reference "
                    f"released; to score other data set {self.setting} to the initial model"
                )

    def logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sequence sums of the label tokens' log-probabilities under the reference."""
        with self.scoring() as model:
            return self._bound().label_logps(inputs, model=model).sequence_sums(inputs)[0]

    def digest(self) -> str:
        """A fingerprint of the scoring weights: keys the precomputed scores in the cache."""
        if self.mode == "initial_policy":
            return self._initial_digest
        policy = self._bound()
        model = self.model if self.model is not None else policy.model
        return weights_digest(model, _strategy(policy))

    # --------------------------------------------------------------- precompute
    def precompute_scores(
        self,
        datamodule: Any,
        columns: tuple[str, ...],
        score: Callable[[dict[str, torch.Tensor]], Scores],
    ) -> None:
        """Add the columns ``score`` gives (per batch) to every split of ``datamodule``, from
        its cache when there, then release the model.

        A resumed fit whose reference is the initial policy cannot score again (the policy
        holds trained weights by now): its first run's columns must still be in the cache.
        """
        policy = self._bound()
        trainer = attached_trainer(policy)
        resuming = trainer is not None and trainer.ckpt_path is not None
        can_score = not (resuming and self.mode == "initial_policy")
        self._precomputing = True
        try:
            datamodule.add_scores(
                columns, score if can_score else None, f"ref_logps-{self.digest()}"
            )
        except LookupError as err:
            raise ValueError(
                "this resumed fit needs the reference log-probs its first run computed from "
                "the initial weights, and they are no longer in the data cache: set "
                f"{self.setting} to the initial model to compute them again"
            ) from err
        finally:
            self._precomputing = False
        rank_zero_info("[reference] log-probabilities precomputed; reference model released")
        self.release()

    def _initial_weights(self, policy: CausalLMModule) -> bool:
        """Whether the policy may still hold its initial weights: in the precompute pass, or
        outside a trainer before any; a trainer may have restored or trained others."""
        return not self._released and (self._precomputing or attached_trainer(policy) is None)

    def _bound(self) -> CausalLMModule:
        if self._policy is None:
            raise RuntimeError("Reference.setup(policy) runs first (in configure_model)")
        return self._policy


def weights_digest(model: torch.nn.Module, strategy: Strategy | None) -> str:
    """A fingerprint of a model's weights without its adapters (per tensor: size, sum, sum
    of squares). Under FSDP and ZeRO-3 each rank sees only its shard: the statistics are
    summed over the ranks, so every rank computes the same digest."""
    names, stats, sharded = [], [], is_fsdp(strategy) if strategy is not None else False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # the reference is the base model without its adapters
                continue
            x, shard = local_part(p)
            x, sharded = x.detach().double(), sharded or shard
            names.append(model_key(name))
            stats.append(torch.stack([torch.tensor(x.numel()).double(), x.sum(), (x * x).sum()]))
    table = torch.stack(stats).to(next(model.parameters()).device)
    if sharded and strategy is not None and parameters_are_sharded(strategy):
        table = strategy.reduce(table, reduce_op="sum")
    digest = hashlib.sha256()
    for name, (n, total, squares) in zip(names, table.tolist(), strict=True):
        digest.update(f"{name}:{int(n)}:{total:.12e}:{squares:.12e}".encode())
    return digest.hexdigest()[:20]


def _strategy(module: CausalLMModule | None) -> Strategy | None:
    return attached_strategy(module) if module is not None else None


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


@contextmanager
def _eval(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
