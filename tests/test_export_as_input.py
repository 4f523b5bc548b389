"""An ``hf/`` export is a clean input: data prepared from its tokenizer is the same data.

Batched generation calls the tokenizer with ``padding=True``, which leaves padding switched
on in the Rust backend; written into ``tokenizer.json``, it used to make every example
prepared from the export padded inside its ``input_ids``.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from src.callbacks.hf_export import export
from src.datamodules import PreferenceDataModule, PretrainDataModule, SFTDataModule
from src.datamodules.chat import encode_texts, encode_with_offsets
from src.datamodules.tokenizer import load_tokenizer
from src.generation import generate
from tests.conftest import ASSETS, ROOT

DEMO = ROOT / "data" / "demo"
PROMPTS = [
    [{"role": "user", "content": "Reverse: red fox"}],
    [{"role": "user", "content": "What is 2 + 2? Answer with the number alone."}],
]


@pytest.fixture(scope="module")
def export_after_generation(tmp_path_factory, micro_model_dir) -> Path:
    """``hf/`` as a fit writes it: the module's tokenizer has served batched generation."""
    tokenizer = load_tokenizer(str(ASSETS))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir))
    generate(model, tokenizer, PROMPTS, max_new_tokens=2)
    out = tmp_path_factory.mktemp("run") / "hf"
    export(SimpleNamespace(model=model, tokenizer=tokenizer), out)
    return out


@pytest.fixture(scope="module")
def padded_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer saved with left padding and truncation switched on in its backend, as
    exports written before the fix are (and as any tokenizer.json may be)."""
    tokenizer = load_tokenizer(str(ASSETS))
    backend = tokenizer.backend_tokenizer
    backend.enable_padding(
        direction="left", pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token
    )
    backend.enable_truncation(max_length=8)
    out = tmp_path_factory.mktemp("padded-tokenizer")
    tokenizer.save_pretrained(out)
    saved = json.loads((out / "tokenizer.json").read_text())
    assert saved["padding"] is not None and saved["truncation"] is not None
    return out


def test_generation_leaves_the_tokenizer_unpadded(micro_model_dir):
    tokenizer = load_tokenizer(str(ASSETS))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir))
    outputs = generate(model, tokenizer, PROMPTS, max_new_tokens=2)
    assert len(outputs) == 2
    assert tokenizer.backend_tokenizer.padding is None
    assert tokenizer.padding_side == "right"


def test_the_export_writes_no_padding_or_truncation(export_after_generation):
    saved = json.loads((export_after_generation / "tokenizer.json").read_text())
    assert saved["padding"] is None
    assert saved["truncation"] is None
    original = json.loads((ASSETS / "tokenizer.json").read_text())
    assert saved["model"] == original["model"]
    assert saved["added_tokens"] == original["added_tokens"]


def test_encoding_ignores_the_padding_a_tokenizer_carries(padded_tokenizer_dir):
    clean = load_tokenizer(str(ASSETS))
    padded = load_tokenizer(str(padded_tokenizer_dir))
    texts = ["a b c d e f g h i j k l", "a"]
    expected = encode_texts(clean, texts)
    assert len(expected[0]) > 8 and len(expected[1]) == 1  # would be cut and padded
    assert encode_texts(padded, texts) == expected
    padded = load_tokenizer(str(padded_tokenizer_dir))
    assert encode_with_offsets(padded, texts) == encode_with_offsets(clean, texts)


MODULES = [
    (SFTDataModule, "sft", ["input_ids", "labels"]),
    (
        PreferenceDataModule,
        "preference",
        ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"],
    ),
    (PretrainDataModule, "pretrain", ["input_ids"]),
]


def prepared(module_class, tokenizer: str, data: dict[str, Path], columns: list[str]) -> dict:
    dm = module_class(
        tokenizer=tokenizer,
        train_files=str(data["train"]),
        val_files=str(data["val"]),
        max_length=256,
        cache_dir=None,
    )
    dm.setup("fit")
    return {split: {c: dm.datasets[split][c] for c in columns} for split in ("train", "val")}


@pytest.mark.parametrize(("module_class", "name", "columns"), MODULES, ids=[m[1] for m in MODULES])
def test_data_from_an_export_or_a_padded_tokenizer_equals_data_from_the_original(
    tmp_path, export_after_generation, padded_tokenizer_dir, module_class, name, columns
):
    data = {}
    for split, n in (("train", 48), ("val", 8)):
        with open(DEMO / f"{name}_{split}.jsonl", encoding="utf-8") as f:
            lines = list(islice(f, n))
        data[split] = tmp_path / f"{split}.jsonl"
        data[split].write_text("".join(lines), encoding="utf-8")
    expected = prepared(module_class, str(ASSETS), data, columns)
    assert len(expected["train"][columns[0]]) > 1
    for source in (export_after_generation, padded_tokenizer_dir):
        assert prepared(module_class, str(source), data, columns) == expected
