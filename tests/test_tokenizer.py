"""One run loads its tokenizer once: the data module uses the model's."""

from __future__ import annotations

from types import SimpleNamespace

from transformers import AutoTokenizer

from src.cli import cli_main, share_tokenizer
from src.datamodules.tokenizer import TokenizerKey
from tests.conftest import ROOT


def test_a_run_loads_the_tokenizer_once(monkeypatch):
    loaded = []
    load = AutoTokenizer.from_pretrained

    def counting(*args, **kwargs):
        loaded.append(args[0])
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counting)
    cli = cli_main(["--config", str(ROOT / "configs" / "sft.yaml")], run=False)
    assert cli.datamodule.tokenizer is cli.model.tokenizer
    assert cli.datamodule.collator().pad_token_id == cli.model.tokenizer.pad_token_id
    assert len(loaded) == 1


def test_a_data_module_with_other_tokenizer_settings_keeps_its_own():
    model = SimpleNamespace(tokenizer_key=TokenizerKey("tok", False, None), tokenizer="model's")
    other = SimpleNamespace(tokenizer_key=TokenizerKey("tok", True, None))
    share_tokenizer(model, other)
    assert "tokenizer" not in vars(other)
    loaded = SimpleNamespace(tokenizer_key=model.tokenizer_key, tokenizer="its own")
    share_tokenizer(model, loaded)
    assert loaded.tokenizer == "its own"
    same = SimpleNamespace(tokenizer_key=TokenizerKey("tok"))
    share_tokenizer(model, same)
    assert same.tokenizer == "model's"
