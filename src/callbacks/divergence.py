"""A guard against divergence: a NaN or Inf loss or gradient stops the run or skips the step."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from src.compat import without_wrapper_prefixes
from src.strategies import engine_owns_gradients

Action = Literal["stop", "skip"]


class DivergenceError(RuntimeError):
    """Training met a non-finite loss or gradient; raised before the step updates anything.

    Attributes:
        step: The optimizer step that was being attempted (``global_step + 1``).
        reason: What was non-finite, in words.
    """

    def __init__(self, step: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.reason = reason


class DivergenceGuard(pl.Callback):
    """Check every optimizer step for a non-finite loss or gradient, before the update.

    A micro-batch loss (the value ``training_step`` returns) is checked as it is
    backpropagated; the gradients once the step's micro-batches are all in, before the
    optimizer runs. Under DDP/FSDP every rank takes the same decision.

    With ``action: stop`` the fit raises ``DivergenceError`` naming the step and what was
    non-finite (the loss, or the first parameter with a non-finite gradient). Nothing of that
    step is applied or saved: the weights are those of the previous step, and the checkpoints
    (``last.ckpt`` included) are those written before it (unless a ``ModelCheckpoint`` was
    explicitly told to ``save_on_exception``). ``train.py`` reports it in one line.

    With ``action: skip`` the step's gradients are dropped, so the optimizer leaves the weights
    and its state untouched (the step still counts towards ``max_steps`` and the learning-rate
    schedule), a warning names the step, and ``train/skipped_steps`` counts the skipped steps.
    After ``max_skips`` skipped steps in a row, the next non-finite step stops the run.

    With fp16 mixed precision the gradient scaler already skips steps whose gradients
    overflow (a normal event there), so only the loss is checked; likewise under DeepSpeed,
    which keeps the gradients in its own partitions (and there only ``stop`` is possible).

    Args:
        action: ``stop`` the run, or ``skip`` the step.
        max_skips: With ``skip``: the most steps skipped in a row before stopping; None
            never stops.
    """

    def __init__(self, action: Action = "stop", max_skips: int | None = 10) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"DivergenceGuard action must be 'stop' or 'skip', not {action!r}")
        if max_skips is not None and max_skips < 0:
            raise ValueError(f"DivergenceGuard max_skips must be >= 0 or None, not {max_skips}")
        self.action = action
        self.max_skips = max_skips
        self.skipped = 0  # steps skipped in the whole run
        self.in_a_row = 0  # steps skipped since the last applied one
        self._check_grads = True
        self._loss_finite: list[torch.Tensor] = []  # one flag per micro-batch of the step

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss_finite = []
        engine = type(trainer.strategy).__name__
        if engine_owns_gradients(trainer.strategy):  # DeepSpeed
            if self.action == "skip":
                raise ValueError(
                    f"DivergenceGuard action 'skip' cannot drop the gradients {engine} keeps in "
                    "its own partitions; use action 'stop'"
                )
            self._check_grads = False
            rank_zero_info(f"[divergence] {engine} owns the gradients: only the loss is checked")
        elif getattr(trainer.precision_plugin, "scaler", None) is not None:
            self._check_grads = False
            rank_zero_info(
                "[divergence] fp16 gradient scaler in use: it skips overflowing steps itself; "
                "only the loss is checked"
            )
        else:
            self._check_grads = True

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss_finite.append(torch.isfinite(loss.detach()).all())  # no sync here

    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        loss_flags, self._loss_finite = self._loss_finite, []
        names, grads = self._grads(pl_module) if self._check_grads else ([], [])
        bad_micro, bad_param = _first_bad(loss_flags, names, grads, pl_module.device)
        local_loss_bad = bad_micro is not None
        if not trainer.strategy.reduce_boolean_decision(
            local_loss_bad or bad_param is not None, all=False
        ):
            self.in_a_row = 0
            self._log(pl_module)
            return
        # only now a second (rare) collective, so every rank words the same decision alike
        loss_bad = trainer.strategy.reduce_boolean_decision(local_loss_bad, all=False)
        step = trainer.global_step + 1
        if loss_bad and local_loss_bad:
            reason = f"non-finite loss (micro-batch {bad_micro + 1} of {len(loss_flags)})"
        elif loss_bad:
            reason = "non-finite loss (on another rank)"
        elif bad_param is not None:
            reason = f"non-finite gradient of {bad_param}"
        else:
            reason = "non-finite gradient (on another rank)"

        if self.action == "skip" and (self.max_skips is None or self.in_a_row < self.max_skips):
            optimizer.zero_grad(set_to_none=True)  # torch optimizers skip params without grad
            self.skipped += 1
            self.in_a_row += 1
            rank_zero_warn(
                f"[divergence] optimizer step {step}: {reason}; skipped the step "
                f"({self.in_a_row} in a row, {self.skipped} in all)"
            )
            self._log(pl_module)
            return
        raise DivergenceError(step, reason, self._message(step, reason))

    # -------------------------------------------------------------- helpers
    def _message(self, step: int, reason: str) -> str:
        after = ""
        if self.action == "skip":
            after = (
                f" ({self.in_a_row} steps skipped in a row before it, max_skips={self.max_skips})"
            )
        return (
            f"optimizer step {step}: {reason}{after}. Stopped before the update: the weights "
            f"are those of step {step - 1} and no checkpoint was written for step {step}. "
            "Resume from the last checkpoint with a lower learning rate or gradient clipping, "
            "or skip such steps with the DivergenceGuard action 'skip'"
        )

    def _log(self, pl_module: pl.LightningModule) -> None:
        if self.action == "skip":
            pl_module.log(
                "train/skipped_steps",
                float(self.skipped),
                on_step=True,
                on_epoch=False,
                sync_dist=False,
                batch_size=1,
            )

    @staticmethod
    def _grads(pl_module: pl.LightningModule) -> tuple[list[str], list[torch.Tensor]]:
        names, grads = [], []
        for name, param in pl_module.named_parameters():
            grad = param.grad
            if grad is None:
                continue
            if hasattr(grad, "to_local"):  # a DTensor: this rank's shard (ranks agree after)
                grad = grad.to_local()
            if grad.numel() == 0:
                continue
            names.append(without_wrapper_prefixes(name))
            grads.append(grad.detach())
        return names, grads

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))


def _first_bad(
    loss_flags: list[torch.Tensor],
    names: list[str],
    grads: list[torch.Tensor],
    device: torch.device,
) -> tuple[int | None, str | None]:
    """The first micro-batch with a non-finite loss and the first parameter with a
    non-finite gradient (None when there is none), with a single device-to-host copy.

    A gradient's min and max are finite exactly when all its elements are: NaN propagates
    through both, +Inf shows in the max, -Inf in the min. No full-size temporary is made.
    """
    flags = [f.to(device) for f in loss_flags]
    for grad in grads:
        low, high = torch.aminmax(grad)
        flags.append((torch.isfinite(low) & torch.isfinite(high)).to(device))
    if not flags:
        return None, None
    finite = torch.stack(flags).cpu().tolist()
    losses, params = finite[: len(loss_flags)], finite[len(loss_flags) :]
    bad_micro = next((i for i, ok in enumerate(losses) if not ok), None)
    bad_param = next((names[i] for i, ok in enumerate(params) if not ok), None)
    return bad_micro, bad_param
