"""scripts/export.py: any checkpoint (file or sharded directory) to a Hugging Face model."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from src.modules import LoraSettings, SFTModule
from tests.conftest import ASSETS, ROOT

spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
export_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_script)


def trained_run(tmp_path, model_dir, lora: dict | None):
    """A run directory (config.yaml, checkpoints/) and the module its checkpoint holds."""
    init_args = {"model_name_or_path": str(model_dir), "from_scratch": True}
    if lora:
        init_args["lora"] = lora
    config = {
        "model": {"class_path": "src.modules.SFTModule", "init_args": init_args},
        "data": {"init_args": {"tokenizer": str(ASSETS), "max_length": 64}},
    }
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(1)  # other weights than the script's own initialisation
    module = SFTModule(
        model_name_or_path=str(model_dir),
        from_scratch=True,
        tokenizer=str(ASSETS),
        lora=LoraSettings(**lora) if lora else None,
    )
    module.configure_model()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return run, module.eval()


IDS = torch.tensor([[5, 9, 14, 20, 7]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_checkpoint_file_exports_the_trained_weights(tmp_path, micro_model_dir):
    run, module = trained_run(tmp_path, micro_model_dir, None)
    ckpt = run / "checkpoints" / "step=7.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 7}, ckpt)
    out = export_script.main([str(ckpt)])
    assert out == run / "hf-step=7"
    exported = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(exported), logits(module.model))
    assert (out / "tokenizer_config.json").exists()


def test_a_sharded_checkpoint_directory_is_consolidated(tmp_path, micro_model_dir):
    """The layout of Lightning's sharded FSDP checkpoints: torch.distributed.checkpoint
    files holding ``model`` and optimizer state, plus meta.pt."""
    import torch.distributed.checkpoint as dcp

    run, module = trained_run(tmp_path, micro_model_dir, {"r": 4})
    folder = run / "checkpoints" / "last.ckpt"
    state = {k: v.clone() for k, v in module.state_dict().items()}
    dcp.save({"model": state}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"global_step": 3}, folder / "meta.pt")
    out = export_script.main([str(folder), "--merge", "--out", str(tmp_path / "exp")])
    assert (out / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(logits(merged), logits(module.model), rtol=1e-4, atol=1e-5)


def test_a_checkpoint_of_another_model_is_refused(tmp_path, micro_model_dir):
    run, module = trained_run(tmp_path, micro_model_dir, None)
    ckpt = run / "checkpoints" / "bad.ckpt"
    torch.save({"state_dict": {"model.unknown.weight": torch.zeros(2)}}, ckpt)
    with pytest.raises(SystemExit, match="does not fit the model"):
        export_script.main([str(ckpt)])


def test_merge_without_lora_is_refused(tmp_path, micro_model_dir):
    run, module = trained_run(tmp_path, micro_model_dir, None)
    ckpt = run / "checkpoints" / "a.ckpt"
    torch.save({"state_dict": module.state_dict()}, ckpt)
    with pytest.raises(SystemExit, match="--merge needs a run trained with LoRA"):
        export_script.main([str(ckpt), "--merge"])
