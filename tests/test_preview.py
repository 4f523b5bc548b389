"""The preview command prints statistics and marks exactly the trained tokens."""

from __future__ import annotations

import io

from src.preview import main
from tests.conftest import ROOT, conversation, write_jsonl


def run_preview(tmp_path, *extra: str) -> str:
    rows = [
        conversation("Reverse: red fox", "fox red", system="Be brief."),
        conversation("Uppercase: sky", "SKY"),
        conversation("Count: a b c", "3"),
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    out = io.StringIO()
    code = main(
        [
            "--config",
            str(ROOT / "configs" / "sft.yaml"),
            "-n",
            "2",
            "--color",
            "never",
            "--data.init_args.train_files",
            str(path),
            "--data.init_args.val_files",
            str(path),
            "--data.init_args.cache_dir",
            str(tmp_path / "cache"),
            *extra,
        ],
        out=out,
    )
    assert code == 0
    return out.getvalue()


def test_statistics_histogram_and_marked_tokens(tmp_path):
    text = run_preview(tmp_path)
    assert "train: 3 rows -> 3 examples" in text and "val: 3 rows -> 3 examples" in text
    assert "train lengths (tokens per example):" in text and "mean " in text
    assert "=== train row 0 ===" in text and "=== train row 2 ===" not in text
    row0 = text.split("=== train row 0 ===")[1].split("=== train row 1 ===")[0]
    assert "[[fox red<|im_end|>]]" in row0
    assert row0.count("[[") == 1  # system and user text are not trained
    assert "Be brief." in row0 and "[[Be brief" not in row0


def test_packed_rows_are_shown_document_by_document(tmp_path):
    text = run_preview(tmp_path, "--data.init_args.packing", "true")
    assert "packed into 1 rows of 256" in text
    assert "--- document 0" in text and "--- document 2" in text
    assert text.count("[[") >= 3


def test_bad_data_is_reported_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n', encoding="utf-8")
    code = main(
        ["--config", str(ROOT / "configs" / "sft.yaml"), "--data.init_args.train_files", str(bad)]
    )
    assert code == 1
    assert "data error: " in capsys.readouterr().err


def test_a_settings_mistake_is_one_line_not_the_parser_s_dump(capsys):
    """Streaming with a fractional val_split: the data module refuses it while the parser
    builds it; the preview says so in one line, as train.py does."""
    code = main(
        [
            "--config",
            str(ROOT / "configs" / "sft.yaml"),
            "--data.init_args.streaming",
            "true",
            "--data.init_args.val_files",
            "null",
        ],
        out=io.StringIO(),
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("data error: a streamed corpus has no known size")
    assert not any("Namespace(" in line or "Traceback" in line for line in err)
