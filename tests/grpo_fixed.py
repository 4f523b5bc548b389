"""A GRPO module whose completions are fixed by the data, for tests that compare runs."""

from __future__ import annotations

import json
from typing import Any

import torch

from src.modules import GRPOModule


class FixedCompletionsGRPO(GRPOModule):
    """GRPO whose completions are each row's ``fixed`` field (a list of
    ``num_generations`` strings), each closed by the EOS: a fit's losses depend on the data
    and the weights alone, not on sampling. ``calls`` counts the generations."""

    calls = 0

    def sample_completions(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        row_fields: list[dict[str, Any]],
        micro: int = 0,
    ) -> torch.Tensor:
        type(self).calls += 1
        g = self.num_generations
        texts = [json.loads(f["fixed"])[i % g] for i, f in enumerate(row_fields)]
        eos = self.tokenizer.eos_token_id
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        out = torch.full((len(ids), max(map(len, ids))), self.tokenizer.pad_token_id)
        for i, row in enumerate(ids):
            out[i, : len(row)] = torch.tensor(row)
        return out.to(prompt_ids.device)


def letter_e(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
    """A reward that random text earns unevenly: its share of the letter e."""
    return [c.count("e") / max(1, len(c)) for c in completions]


class UnevenLengthsGRPO(GRPOModule):
    """GRPO whose rank 0 samples at most 2 tokens and the other ranks ``max_new_tokens``: the
    ranks finish decoding at different steps, as real completions do."""

    def sample_completions(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        limit = self.max_new_tokens
        self.max_new_tokens = 2 if self.trainer.global_rank == 0 else limit
        try:
            return super().sample_completions(*args, **kwargs)
        finally:
            self.max_new_tokens = limit


def row_score(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
    """A reward that ignores the completion: the row's own ``score`` field."""
    return [float(s) for s in fields["score"]]
