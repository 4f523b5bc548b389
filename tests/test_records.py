"""Bad input gets a clear error that names the file and line or row."""

from __future__ import annotations

import pytest

from src.datamodules.formats import to_chat
from src.datamodules.records import DataError, read_records
from tests.conftest import conversation, write_jsonl


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n\n{"messages": [oops]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        read_records(str(path))


def test_records_carry_their_line(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert [r.where.rsplit(":", 1)[1] for r in read_records(str(path))] == ["1", "3"]


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl:1: not valid UTF-8"):
        read_records(str(path))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csvx").write_text("a")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(str(tmp_path / "x.csvx"))


def test_row_missing_fields_names_row_and_expected_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation("q", "a"), {"question": "q"}])
    records = read_records(str(path))
    assert to_chat(records[0])["messages"][1]["content"] == "a"
    with pytest.raises(DataError, match=r"d\.jsonl:2: cannot tell the format.*(messages)"):
        to_chat(records[1])
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:2: a 'alpaca' row needs the fields "
        r"instruction, output; missing instruction, output",
    ):
        to_chat(records[1], "alpaca")


def test_unknown_role_and_empty_conversation(tmp_path):
    rows = [{"messages": [{"role": "robot", "content": "hi"}]}, {"messages": []}]
    records = read_records(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    with pytest.raises(DataError, match=r"d\.jsonl:1: message 0 has unknown role 'robot'"):
        to_chat(records[0])
    with pytest.raises(DataError, match=r"d\.jsonl:2: empty conversation"):
        to_chat(records[1])


def test_alpaca_row_becomes_a_conversation(tmp_path):
    row = {
        "instruction": "Sort these numbers.",
        "input": "3 1 2",
        "output": "1 2 3",
        "system": "Be terse.",
    }
    records = read_records(str(write_jsonl(tmp_path / "a.jsonl", [row])))
    assert to_chat(records[0])["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Sort these numbers.\n\n3 1 2"},
        {"role": "assistant", "content": "1 2 3"},
    ]


def test_json_and_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.json").write_text('[{"instruction": "i", "output": "o"}]', encoding="utf-8")
    assert read_records(str(tmp_path / "d.json"))[0].where.endswith("d.json row 0")
    pq.write_table(
        pa.Table.from_pylist([{"instruction": "i", "output": "o"}] * 2), tmp_path / "d.parquet"
    )
    records = read_records(str(tmp_path / "d.parquet"))
    assert len(records) == 2 and records[1].where.endswith("d.parquet row 1")


def test_line_separators_inside_json_strings_are_not_line_breaks(tmp_path):
    path = tmp_path / "u2028.jsonl"
    path.write_text('{"text": "a\u2028b"}\n{"text": "c"}\n', encoding="utf-8")
    records = read_records(str(path))
    assert [r.row["text"] for r in records] == ["a\u2028b", "c"]
    assert records[1].where.endswith(":2")
