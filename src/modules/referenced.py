"""What objectives scored against a reference share (DPO, KTO): the reference's life cycle,
and its log-probabilities, live or precomputed as columns of the data."""

from __future__ import annotations

from typing import Any

import torch

from src.modules.base import CausalLMModule
from src.modules.reference import Reference, Scores
from src.strategies import call_outside_step


class ReferencedModule(CausalLMModule):
    """A policy measured against a ``Reference`` (see ``reference.py``), or against none
    (``reference`` None: reference-free losses).

    A subclass sets ``reference`` in ``__init__``, says which rows the reference scores
    (``scored_inputs``: one batch of blocks of rows, a block per column) and names the
    precomputed columns of those blocks (``reference_columns``). Its losses are per pair or
    per row, so the sums it backpropagates need no scaling (``loss_divisor`` 1).
    """

    reference_columns: tuple[str, ...] = ()
    reference: Reference | None = None

    @property
    def loss_divisor(self) -> float:
        return 1.0  # losses per pair or per row are O(1) already

    def scored_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows the reference scores, one block per ``reference_columns`` entry."""
        raise NotImplementedError

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
        """Reference log-probs of every row as columns of the data, then no reference model."""
        self.reference.precompute_scores(datamodule, self.reference_columns, self._score_columns)

    def _score_columns(self, batch: dict[str, torch.Tensor]) -> Scores:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        blocks = call_outside_step(self, "reference_logps", batch).chunk(
            len(self.reference_columns)
        )
        if "row_pairs" in batch:  # packed: a list per row, its pairs' values
            split = batch["row_pairs"].tolist()
            blocks = tuple(list(block.split(split)) for block in blocks)
        return dict(zip(self.reference_columns, blocks, strict=True))

    def reference_logps(
        self, batch: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Summed log-probabilities under the reference: the precomputed columns one after
        the other when the batch holds them, else of ``inputs`` (default: every block of
        ``scored_inputs``)."""
        if self.reference_columns[0] in batch:
            return torch.cat([batch[key] for key in self.reference_columns])
        return self.reference.logps(self.scored_inputs(batch) if inputs is None else inputs)
