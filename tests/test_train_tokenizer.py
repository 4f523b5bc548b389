"""scripts/train_tokenizer.py writes a tokenizer that plain AutoTokenizer loads and uses."""

from __future__ import annotations

import importlib.util

from transformers import AutoTokenizer

from src.datamodules import SFTDataModule
from tests.conftest import ROOT, conversation, write_jsonl


def load_script():
    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", ROOT / "scripts" / "train_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trained_tokenizer_round_trips_and_serves_sft(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    write_jsonl(corpus / "b.jsonl", [{"text": f"number {i} is here"} for i in range(200)])
    out = tmp_path / "tok"
    assert (
        load_script().main(["--corpus", str(corpus), "--out", str(out), "--vocab-size", "400"]) == 0
    )
    assert "written to" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(out)
    assert 300 < len(tok) <= 400
    text = "the lazy fox, number 17!"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok("the quick brown fox")["input_ids"]) < len(
        "the quick brown fox"
    )  # merges learnt
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # the chat template and EOS work with the SFT pipeline
    data = write_jsonl(tmp_path / "sft.jsonl", [conversation("the fox?", "the dog")])
    dm = SFTDataModule(tokenizer=str(out), train_files=str(data), val_split=0, cache_dir=None)
    dm.setup("fit")
    labels = [t for t in dm.datasets["train"]["labels"][0] if t != -100]
    assert tok.decode(labels) == "the dog<|im_end|>"


def test_a_corpus_without_the_text_field_is_a_clear_error(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}])
    assert load_script().main(["--corpus", str(bad), "--out", str(tmp_path / "t")]) == 1
    assert "no text field 'text' (set --field)" in capsys.readouterr().err
