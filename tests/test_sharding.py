"""Sharded strategies without a GPU: presets, the layer policy, state-dict keys, exports, and
the DeepSpeed-style loss scaling."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import ShardingStrategy
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from src.callbacks.hf_export import export
from src.compat import saves_distributed_checkpoint
from src.modules import LoraSettings, SFTModule
from src.strategies import (
    LayerFSDP2Strategy,
    LayerFSDPStrategy,
    decoder_layer_classes,
    full_state_dict,
    model_key,
    zero_stage,
)
from tests.conftest import ASSETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def micro_module(model_dir, **kwargs) -> SFTModule:
    torch.manual_seed(0)
    module = SFTModule(
        model_name_or_path=str(model_dir), from_scratch=True, tokenizer=str(ASSETS), **kwargs
    )
    module.configure_model()
    return module


def preset_strategy(name: str) -> dict:
    return yaml.safe_load((CONFIGS / "trainer" / name).read_text())["strategy"]


def test_fsdp_preset_instantiates_layer_sharding():
    spec = preset_strategy("fsdp.yaml")
    assert spec["class_path"] == "src.strategies.LayerFSDPStrategy"
    strategy = LayerFSDPStrategy(**spec["init_args"])
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "sharded" and strategy.checkpoint_layers
    hybrid = LayerFSDPStrategy(sharding_strategy="HYBRID_SHARD")
    assert hybrid.sharding_strategy == ShardingStrategy.HYBRID_SHARD


def test_fsdp2_preset_instantiates_layer_sharding():
    spec = preset_strategy("fsdp2.yaml")
    assert spec["class_path"] == "src.strategies.LayerFSDP2Strategy"
    strategy = LayerFSDP2Strategy(**spec["init_args"])
    assert (strategy.param_dtype, strategy.reduce_dtype) == ("bfloat16", "float32")
    assert strategy.checkpoint_layers and not strategy.cpu_offload
    assert strategy._tensor_parallel_size == 1  # every process a data-parallel shard
    assert saves_distributed_checkpoint(strategy)


def test_layer_policy_is_found_from_the_model(micro_model_dir, monkeypatch):
    module = micro_module(micro_model_dir)
    assert decoder_layer_classes(module) == {LlamaDecoderLayer}
    lora = micro_module(micro_model_dir, lora=LoraSettings(r=4))
    assert decoder_layer_classes(lora) == {LlamaDecoderLayer}  # through the peft wrapper

    seen = {}

    def setup_model(self, model):
        seen.update(self.kwargs)
        return model

    monkeypatch.setattr(FSDPStrategy, "_setup_model", setup_model)
    # a GPU's path (Lightning wraps); the CPU path runs for real in tests/test_ddp.py
    strategy = LayerFSDPStrategy(parallel_devices=[torch.device("cuda", 0)], checkpoint_layers=True)
    strategy._setup_model(module)
    layer, norm = module.model.model.layers[0], module.model.model.norm
    for policy in (
        seen["auto_wrap_policy"],
        strategy._activation_checkpointing_kwargs["auto_wrap_policy"],
    ):
        assert policy._module_classes == {LlamaDecoderLayer}
        assert policy(layer, recurse=False, nonwrapped_numel=0)
        assert not policy(norm, recurse=False, nonwrapped_numel=0)


def test_a_model_without_layer_names_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot find the decoder layer class of Linear"):
        decoder_layer_classes(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "name, stage, offload",
    [("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)],
)
def test_deepspeed_presets(name, stage, offload):
    spec = preset_strategy(f"deepspeed_{name}.yaml")
    path = Path(spec["init_args"]["config"])
    assert path == Path("configs/deepspeed") / f"{name}.json"
    config = json.loads((CONFIGS.parent / path).read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload == ("offload_param" in zero)
    # Lightning fills these from the trainer; setting them here would conflict
    assert not {"gradient_accumulation_steps", "train_micro_batch_size_per_gpu"} & set(config)
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]'): parsed only")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(config=str(CONFIGS.parent / path))
    assert zero_stage(strategy) == stage


def test_strategy_wrappers_are_stripped_from_keys():
    hf = "model.layers.0.self_attn.q_proj.weight"
    for key in (
        f"model.{hf}",  # the LightningModule's attribute
        f"_forward_module.model.{hf}",  # DeepSpeed's wrapper
        f"module.model.{hf}",
        "model.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.q_proj.weight",
    ):
        assert model_key(key) == hf


def test_unsharded_strategies_export_the_model_as_it_is(micro_model_dir):
    class Plain:
        strategy = object()
        is_global_zero = True

    assert full_state_dict(Plain(), micro_module(micro_model_dir)) is None


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, merge=True)])
def test_export_of_gathered_weights_equals_the_plain_export(micro_model_dir, tmp_path, lora):
    """What rank 0 writes from a gathered full state dict equals the export of the model."""
    module = micro_module(micro_model_dir, lora=lora)
    with torch.no_grad():  # trained-looking weights, adapters included
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    gathered = {model_key(k): v.clone() for k, v in module.state_dict().items()}
    export(module, tmp_path / "plain")
    export(module, tmp_path / "gathered", gathered)
    ids = torch.tensor([[5, 6, 7, 8]])
    if lora is None:
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "gathered")
    else:
        assert (tmp_path / "gathered" / "adapter_model.safetensors").exists()
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain" / "merged")
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "gathered" / "merged")
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits)
        module.model.eval()  # no LoRA dropout
        torch.testing.assert_close(b(ids).logits, module.model(input_ids=ids).logits)


def test_engine_style_loss_scaling_gives_the_step_mean(micro_model_dir):
    """Under DeepSpeed each micro-batch's summed loss is divided by the unit count over all
    devices before backward: the gradient equals that of the mean loss."""

    class OneDevice:
        def reduce(self, value, reduce_op):
            return value

    class FakeTrainer:
        strategy = OneDevice()
        world_size = 1

    ids = torch.randint(0, 200, (3, 20))
    labels = ids.clone()
    labels[0, :12] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    module = micro_module(micro_model_dir)
    module._scale_loss = True
    module._trainer = FakeTrainer()
    loss = module.training_step(batch, 0)
    terms = module.loss_terms(batch)
    assert loss.item() == pytest.approx((terms.loss_sum / terms.count).item(), rel=1e-6)


def test_dpo_reference_is_sharded_like_the_policy_under_fsdp(micro_model_dir, monkeypatch):
    import src.modules.reference as reference
    from src.modules import DPOModule

    sharded = []
    monkeypatch.setattr(reference, "shard_like_policy", lambda s, m: sharded.append(m) or "sharded")

    class FakeTrainer:
        strategy = LayerFSDPStrategy()
        ckpt_path = None
        accumulate_grad_batches = 1

    module = DPOModule(model_name_or_path=str(micro_model_dir), from_scratch=True)
    module._trainer = FakeTrainer()
    module.configure_model()
    copy = module.reference.model
    assert copy is not None and copy is not module.model
    module.on_fit_start()
    assert sharded == [copy] and module.reference.model == "sharded"


@pytest.mark.parametrize("preset", ["fsdp.yaml", "fsdp2.yaml"])
def test_presets_instantiated_as_the_cli_does_keep_their_layer_policies(preset):
    """jsonargparse passes every parent argument it knows, None included: the decoder-layer
    policies must survive an explicit ``auto_wrap_policy=None``."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    from src.strategies import DecoderLayerPolicy

    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    strategy = parser.instantiate_classes(
        parser.parse_object({"strategy": preset_strategy(preset)})
    ).strategy
    if isinstance(strategy, LayerFSDPStrategy):
        assert isinstance(strategy.kwargs["auto_wrap_policy"], DecoderLayerPolicy)
        assert isinstance(
            strategy._activation_checkpointing_kwargs["auto_wrap_policy"], DecoderLayerPolicy
        )
    else:
        assert strategy.checkpoint_layers and strategy.param_dtype == "bfloat16"
