"""Model options: torch.compile in place, Liger kernels, QLoRA and adapters' clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from src.modules import LoraSettings, SFTModule
from tests.conftest import ASSETS


def module(model_dir, **kwargs) -> SFTModule:
    return SFTModule(
        model_name_or_path=str(model_dir), from_scratch=True, tokenizer=str(ASSETS), **kwargs
    )


def test_compile_keeps_parameter_names_and_checkpoint_keys(micro_model_dir):
    plain, compiled = module(micro_model_dir), module(micro_model_dir, compile=True)
    for m in (plain, compiled):
        m.configure_model()
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert compiled.model._compiled_call_impl is not None


@pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed"
)
def test_liger_without_the_package_is_a_clear_error(micro_model_dir):
    with pytest.raises(ValueError, match="needs the liger-kernel package"):
        module(micro_model_dir, liger_kernels=True).configure_model()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_qlora_without_cuda_is_a_clear_error(micro_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir)).save_pretrained(
        tmp_path
    )
    qlora = SFTModule(
        model_name_or_path=str(tmp_path),
        tokenizer=str(ASSETS),
        lora=LoraSettings(load_in_4bit=True),
    )
    with pytest.raises(ValueError, match="QLoRA .* needs a CUDA GPU"):
        qlora.configure_model()


def test_lora_variants_and_trainable_count(micro_model_dir, caplog):
    for settings in (LoraSettings(r=4), LoraSettings(r=4, use_dora=True, use_rslora=True)):
        m = module(micro_model_dir, lora=settings)
        m.configure_model()
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        config = m.model.peft_config["default"]
        assert (config.use_dora, config.use_rslora) == (settings.use_dora, settings.use_rslora)


def test_training_continues_from_an_existing_adapter(micro_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir)).save_pretrained(
        base
    )
    first = SFTModule(model_name_or_path=str(base), tokenizer=str(ASSETS), lora=LoraSettings(r=4))
    first.configure_model()
    with torch.no_grad():
        for name, p in first.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # a trained adapter
    first.model.save_pretrained(tmp_path / "adapter")
    again = SFTModule(
        model_name_or_path=str(base),
        tokenizer=str(ASSETS),
        lora=LoraSettings(adapter_path=str(tmp_path / "adapter")),
    )
    again.configure_model()
    loaded = {n: p for n, p in again.model.named_parameters() if "lora_B" in n}
    assert loaded and all(torch.allclose(p, torch.full_like(p, 0.01)) for p in loaded.values())
    assert all(p.requires_grad for p in loaded.values())


def test_gradient_checkpointing_gives_the_same_gradients(micro_model_dir):
    ids = torch.randint(0, 200, (2, 24))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        m = module(micro_model_dir, gradient_checkpointing=checkpointing)
        m.configure_model()
        assert m.model.is_gradient_checkpointing == checkpointing
        m.loss_terms(batch).loss_sum.backward()
        grads.append({n: p.grad.clone() for n, p in m.model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_flex_attention_on_a_cpu_is_a_clear_error(micro_model_dir, tmp_path):
    import lightning.pytorch as pl

    from src.datamodules import SFTDataModule
    from tests.conftest import conversation, write_jsonl

    data = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files=str(write_jsonl(tmp_path / "t.jsonl", [conversation("Hi", "Hello")] * 4)),
        val_split=0,
        cache_dir=None,
    )
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="flex_attention needs a CUDA GPU"):
        trainer.fit(module(micro_model_dir, attn_implementation="flex_attention"), data)
