"""The reference of preference objectives: its mode chosen once, scoring, digest, refusals."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from src.errors import ConfigError
from src.modules import DPOModule, LoraSettings, losses
from src.modules.pairs import pair_inputs
from src.modules.reference import Reference, choose_mode
from tests.test_preference_losses import batch, dpo_module  # noqa: F401  (batch: a fixture)


@pytest.mark.parametrize(
    ("name", "lora", "precompute", "fsdp", "mode"),
    [
        (None, False, False, False, "frozen_copy"),
        (None, False, True, False, "initial_policy"),
        (None, False, True, True, "frozen_copy"),  # FSDP gathers root shards only in a step
        (None, True, False, False, "adapters_off"),
        (None, True, True, False, "adapters_off"),
        ("some/model", False, False, False, "separate"),
        ("some/model", True, True, True, "separate"),  # a model named is the model used
    ],
)
def test_the_mode_follows_the_settings(name, lora, precompute, fsdp, mode):
    assert choose_mode(name, lora, precompute, fsdp) == mode


def test_a_separate_reference_scores_with_that_model(tmp_path, micro_model_dir, batch):  # noqa: F811
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(_config(micro_model_dir)).eval()
    other.save_pretrained(tmp_path / "ref")
    module = dpo_module(micro_model_dir, ref_model_name_or_path=str(tmp_path / "ref"))
    assert module.reference.mode == "separate"
    inputs = pair_inputs(batch)
    with torch.no_grad():
        expected = losses.sequence_logps(
            other(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits,
            inputs["labels"],
        )[0]
    # the lean head against full logits: equal up to float32 summation order
    torch.testing.assert_close(module.reference_logps(batch), expected, rtol=1e-6, atol=1e-5)
    policy = losses.sequence_logps(module(inputs), inputs["labels"])[0]
    assert not torch.allclose(policy, expected, atol=1e-3)  # not the policy's own


def test_lora_with_a_named_reference_uses_the_named_model(tmp_path, micro_model_dir):
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(_config(micro_model_dir)).save_pretrained(tmp_path / "ref")
    module = dpo_module(
        micro_model_dir,
        ref_model_name_or_path=str(tmp_path / "ref"),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
    )
    assert module.reference.mode == "separate" and module.reference.model is not None


def test_the_digest_names_the_weights_and_ignores_adapters(micro_model_dir):
    first, second = dpo_module(micro_model_dir), dpo_module(micro_model_dir)
    assert first.reference.digest() == second.reference.digest()
    with torch.no_grad():
        next(second.reference.model.parameters()).add_(1e-3)
    assert first.reference.digest() != second.reference.digest()
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    adapted = dpo_module(micro_model_dir, lora=lora)
    before = adapted.reference.digest()
    with torch.no_grad():  # trained adapters do not change what the reference is
        for name, p in adapted.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    assert adapted.reference.digest() == before


def test_the_initial_policy_scores_only_while_it_holds_the_initial_weights(
    micro_model_dir,
    batch,  # noqa: F811
):
    module = dpo_module(micro_model_dir, precompute_ref_logps=True)
    assert module.reference.mode == "initial_policy" and module.reference.model is None
    inputs = pair_inputs(batch)
    policy = module.label_logps(inputs).sequence_sums()[0]  # the same head path
    assert torch.equal(module.reference_logps(batch), policy.detach())
    module._trainer = types.SimpleNamespace(strategy=None)  # a trainer may restore weights
    with pytest.raises(RuntimeError, match="ref_model_name_or_path to the initial model"):
        module.reference_logps(batch)


def test_zero3_refuses_a_copy_and_names_the_ways_out(micro_model_dir):
    class ZeRO3:
        handles_gradient_accumulation = True
        config = {"zero_optimization": {"stage": 3}}

        def reduce(self, tensor, reduce_op):
            return tensor  # one process: the sum over ranks is its own

    trainer = types.SimpleNamespace(strategy=ZeRO3(), ckpt_path=None)
    model = AutoModelForCausalLM.from_config(_config(micro_model_dir))
    for precompute, mode in ((False, None), (True, "initial_policy")):
        module = DPOModule(model_name_or_path=str(micro_model_dir), precompute_ref_logps=precompute)
        module.model, module._trainer = model, trainer  # built (partitioned) by the strategy
        if mode is None:
            with pytest.raises(ConfigError, match="precompute_ref_logps true .* LoRA .* or fsdp"):
                module.reference.setup(module)
        else:
            module.reference.setup(module)
            assert module.reference.mode == mode and module.reference.model is None


def test_reference_free_losses_build_no_reference(micro_model_dir):
    for loss_type in ("simpo", "orpo"):
        assert dpo_module(micro_model_dir, loss_type=loss_type).reference is None


def test_an_unbound_reference_says_what_to_call_first():
    with pytest.raises(RuntimeError, match="setup"):
        Reference().digest()


def _config(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)
