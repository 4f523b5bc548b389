"""Preference losses are rows of one table: the choices, the calls, and a new loss in one row."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
import torch.nn.functional as F

from src.modules import DPOModule, losses
from src.modules.dpo import LossType
from src.modules.pairs import pair_inputs
from tests.conftest import ASSETS
from tests.test_preference_losses import batch  # noqa: F401  (a fixture)


def test_the_loss_type_choices_are_the_table():
    assert typing.get_args(LossType) == tuple(losses.PREFERENCE_LOSSES)
    assert set(losses.PREFERENCE_LOSSES) == {"sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"}


@pytest.mark.parametrize("name", list(losses.PREFERENCE_LOSSES))
def test_each_row_calls_its_function_with_what_it_takes(name):
    row = losses.PREFERENCE_LOSSES[name]
    params = inspect.signature(row.fn).parameters
    positional = ["chosen", "rejected"] + (
        ["ref_chosen", "ref_rejected"] if row.needs_reference else []
    )
    assert list(params)[: len(positional)] == positional
    assert "beta" in params and all(option in params for option in row.options)
    for option in row.options:  # each option is a setting of the module
        assert option in inspect.signature(DPOModule.__init__).parameters


def test_a_new_loss_is_one_function_and_one_row(monkeypatch, micro_model_dir, batch):  # noqa: F811
    """A margin loss on per-token means with an option of its own, added to the table only."""

    def squared_margin_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, gamma=0.5):
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        return (
            (beta * h - gamma) ** 2,
            beta * (chosen - ref_chosen),
            beta * (rejected - ref_rejected),
        )

    row = losses.PreferenceLoss(squared_margin_loss, per_token_mean=True, options=("gamma",))
    monkeypatch.setitem(losses.PREFERENCE_LOSSES, "squared_margin", row)
    torch.manual_seed(0)
    module = DPOModule(
        model_name_or_path=str(micro_model_dir),
        from_scratch=True,
        tokenizer=str(ASSETS),
        loss_type="squared_margin",
        beta=0.5,
        gamma=0.25,
    )
    module.configure_model()
    with torch.no_grad():  # move the policy off its reference
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = pair_inputs(batch)
    logps, counts = losses.sequence_logps(module(inputs), inputs["labels"])
    ref = module.reference_logps(batch)
    means, ref_means = logps / counts, ref / counts
    h = (means[:4] - ref_means[:4]) - (means[4:] - ref_means[4:])
    expected = ((0.5 * h - 0.25) ** 2).sum()
    terms = module.loss_terms(batch)
    assert terms.loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms.count.item() == 4


def test_orpo_row_fixes_the_nll_weight(micro_model_dir):
    module = DPOModule(model_name_or_path=str(micro_model_dir), loss_type="orpo", sft_weight=0.3)
    assert module.sft_weight == 1.0
    module = DPOModule(model_name_or_path=str(micro_model_dir), loss_type="sigmoid", sft_weight=0.3)
    assert module.sft_weight == 0.3


def test_sigmoid_row_equals_the_function_it_names():
    c, r, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.5, -11.0, -12.0))
    loss = losses.PREFERENCE_LOSSES["sigmoid"].fn(c, r, rc, rr, beta=0.1, label_smoothing=0.0)[0]
    assert loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(0.15)).item(), rel=1e-6)
