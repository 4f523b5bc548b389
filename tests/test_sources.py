"""Sources: csv/txt/directories/globs/hub ids, column mapping, mixing, fingerprints, config."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter

import pytest

from src.datamodules import DataError, SFTDataModule, Source
from src.datamodules.records import iter_records, local_files, read_records
from src.datamodules.sources import as_sources, fingerprint, mix
from tests.conftest import ASSETS, ROOT, conversation, write_jsonl

# ------------------------------------------------------------------ csv


def test_csv_header_and_json_message_cells(tmp_path):
    messages = [{"role": "user", "content": "hi, there"}, {"role": "assistant", "content": "yo"}]
    path = tmp_path / "d.csv"
    cell = json.dumps(messages).replace('"', '""')
    path.write_text(
        f'instruction,output,messages\nSay hi,"hi, you","{cell}"\n[not json,ok,{{}}\n',
        encoding="utf-8",
    )
    records = read_records(str(path))
    assert [r.where for r in records] == [f"{path}:2", f"{path}:3"]
    assert records[0].row == {"instruction": "Say hi", "output": "hi, you", "messages": messages}
    # a cell that only looks like JSON stays a string; a JSON object cell is decoded
    assert records[1].row == {"instruction": "[not json", "output": "ok", "messages": {}}


@pytest.mark.parametrize("bad_row", ["a,b,c,d", "only_one"], ids=["too_many", "too_few"])
def test_csv_row_with_wrong_column_count_names_file_and_line(tmp_path, bad_row):
    path = tmp_path / "bad.csv"
    path.write_text(f"x,y,z\n1,2,3\n4,5,6\n{bad_row}\n7,8,9\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:4: 3 columns in the header"):
        read_records(str(path))


# ------------------------------------------------------------------ txt

TEXT = "First line.\nSecond line.\n\n\nNew paragraph here.\n  \nLast one.\n"


def test_txt_as_one_document(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    [record] = read_records(str(path), text_unit="document")
    assert record.row == {"text": TEXT} and record.where == str(path)


def test_txt_by_paragraph(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    records = read_records(str(path), text_unit="paragraph")
    assert [r.row["text"] for r in records] == [
        "First line.\nSecond line.",
        "New paragraph here.",
        "Last one.",
    ]
    assert [r.where for r in records] == [f"{path} paragraph {i}" for i in range(3)]


def test_txt_by_line_skips_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    records = read_records(str(path), text_unit="line")
    assert [r.row["text"] for r in records] == [
        "First line.",
        "Second line.",
        "New paragraph here.",
        "Last one.",
    ]
    assert [r.where.rsplit(":", 1)[1] for r in records] == ["1", "2", "5", "7"]


def test_empty_txt_document_yields_nothing(tmp_path):
    (tmp_path / "e.txt").write_text("\n \n", encoding="utf-8")
    assert read_records(str(tmp_path / "e.txt")) == []


# --------------------------------------------------------- directories and globs


def make_tree(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    write_jsonl(root / "b.jsonl", [{"text": "b"}])
    write_jsonl(root / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    (root / "sub" / "c.txt").write_text("c", encoding="utf-8")
    (root / "sub" / "deeper" / "d.json").write_text('[{"text": "d"}]', encoding="utf-8")
    (root / "README.md").write_text("# not data", encoding="utf-8")
    (root / "notes.yaml").write_text("a: 1", encoding="utf-8")
    (root / "sub" / "x.jsonl.bak").write_text("{bad", encoding="utf-8")


def test_directory_is_read_recursively_sorted_data_files_only(tmp_path):
    make_tree(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in local_files(str(tmp_path))] == [
        "a.jsonl",
        "b.jsonl",
        "sub/c.txt",
        "sub/deeper/d.json",
    ]
    assert [r.row["text"] for r in read_records(str(tmp_path))] == ["a1", "a2", "b", "c", "d"]


def test_glob_matches_sorted_files(tmp_path):
    make_tree(tmp_path)
    assert [r.row["text"] for r in read_records(str(tmp_path / "*.jsonl"))] == ["a1", "a2", "b"]
    assert [r.row["text"] for r in read_records(str(tmp_path / "**" / "*.json"))] == ["d"]
    recursive = read_records(str(tmp_path / "**" / "[a-d].*"))
    assert [r.row["text"] for r in recursive] == ["a1", "a2", "b", "c", "d"]
    # a glob is taken at its word: a file it names in an unknown format is an error
    with pytest.raises(DataError, match=r"x\.jsonl\.bak: unsupported file type '\.bak'"):
        read_records(str(tmp_path / "**" / "*.json*"))


def test_glob_matching_nothing_and_empty_directory_are_errors(tmp_path):
    with pytest.raises(DataError, match=r"no file matches .*\*\.parquet"):
        read_records(str(tmp_path / "*.parquet"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="the directory holds no data files"):
        read_records(str(empty))
    (empty / "README.md").write_text("nothing to train on", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty: the directory holds no data files \(\.csv"):
        read_records(str(empty))


# ------------------------------------------------------------------ hub ids


def test_local_directory_of_parquet_and_json_is_read_as_local_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "p0"}, {"text": "p1"}]), tmp_path / "a.parquet")
    (tmp_path / "b.json").write_text('{"data": [{"text": "j0"}]}', encoding="utf-8")
    records = list(iter_records(str(tmp_path), streaming=True))
    assert [r.row["text"] for r in records] == ["p0", "p1", "j0"]
    assert records[0].where == f"{tmp_path / 'a.parquet'} row 0"


def test_unknown_hub_id_is_a_clear_error_offline():
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"  # set by conftest: nothing is downloaded
    assert local_files("nobody-here/no-such-dataset") is None
    with pytest.raises(
        DataError,
        match=r"'nobody-here/no-such-dataset' is neither a local file nor a loadable hub dataset",
    ):
        read_records("nobody-here/no-such-dataset")


def test_path_like_ids_that_do_not_exist_are_missing_files(tmp_path):
    for missing in ("./nowhere/data", str(tmp_path / "gone"), "data.parquet"):
        with pytest.raises(DataError, match="data file not found"):
            read_records(missing)


# ------------------------------------------------------------------ Source


def test_columns_mapping_renames_fields_and_max_rows_limits(tmp_path):
    rows = [{"dialog": conversation(f"q{i}", f"a{i}")["messages"], "id": i} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    source = Source(str(path), columns={"messages": "dialog"}, max_rows=3)
    records = list(source.records(index=7))
    assert len(records) == 3
    assert [r.source for r in records] == [7, 7, 7]
    assert set(records[0].row) == {"messages", "id"}
    assert records[2].row["messages"][1]["content"] == "a2"
    assert records[2].where == f"{path}:3"


def test_source_weight_must_be_positive():
    with pytest.raises(DataError, match="weight must be positive, got 0"):
        Source("x.jsonl", weight=0)


def test_as_sources_accepts_paths_dicts_and_sources():
    given = ["a.jsonl", {"path": "b.jsonl", "weight": 2.5}, Source("c.jsonl", format="text")]
    sources = as_sources(given)
    assert [(s.path, s.weight, s.format) for s in sources] == [
        ("a.jsonl", 1.0, None),
        ("b.jsonl", 2.5, None),
        ("c.jsonl", 1.0, "text"),
    ]
    assert as_sources(None) == [] and as_sources("x.csv") == [Source("x.csv")]


def test_per_source_format_and_columns_through_the_data_module(tmp_path):
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [{"question": "Add 2 and 2.", "answer": "4"}, {"question": "Add 1 and 1.", "answer": "2"}],
    )
    share = write_jsonl(
        tmp_path / "share.jsonl",
        [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}],
    )
    chats = write_jsonl(tmp_path / "chat.jsonl", [conversation("Name a color.", "Red")] * 3)
    dm = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files=[
            {
                "path": str(alpaca),
                "format": "alpaca",
                "columns": {"instruction": "question", "output": "answer"},
            },
            Source(str(share), format="sharegpt"),
            {"path": str(chats), "max_rows": 1},
        ],
        format="messages",  # the default for sources without their own
        val_split=0,
        cache_dir=None,
    )
    dm.setup("fit")
    assert dm.stats["train"].rows == 4 and dm.stats["train"].examples == 4
    decoded = [dm.tokenizer.decode(ids) for ids in dm.datasets["train"]["input_ids"]]
    assert decoded == [
        "<|im_start|>user\nAdd 2 and 2.<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>user\nAdd 1 and 1.<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHey<|im_end|>\n",
        "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\nRed<|im_end|>\n",
    ]


# ------------------------------------------------------------------ mixing


def numbered(tmp_path, name, n):
    return str(write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name}{i}"} for i in range(n)]))


def texts(records):
    return [r.row["text"] for r in records]


def test_concat_keeps_file_order(tmp_path):
    sources = [Source(numbered(tmp_path, "a", 3)), Source(numbered(tmp_path, "b", 2), weight=9)]
    records = list(mix(sources, "concat", seed=1))
    assert texts(records) == ["a0", "a1", "a2", "b0", "b1"]
    assert [r.source for r in records] == [0, 0, 0, 1, 1]


def test_interleave_is_seeded(tmp_path):
    sources = [Source(numbered(tmp_path, "a", 30)), Source(numbered(tmp_path, "b", 30))]
    first = texts(mix(sources, "interleave", seed=3))
    assert first == texts(mix(sources, "interleave", seed=3))
    assert first != texts(mix(sources, "interleave", seed=4))
    # each source's rows keep their own order
    assert [t for t in first if t[0] == "a"] == [
        f"a{i}" for i in range(sum(t[0] == "a" for t in first))
    ]


def test_interleave_shares_follow_the_weights(tmp_path):
    sources = [
        Source(numbered(tmp_path, "a", 4000), weight=3),
        Source(numbered(tmp_path, "b", 4000), weight=1),
    ]
    draws = list(itertools.islice(mix(sources, "interleave", 0, "all_exhausted"), 4000))
    share = Counter(r.source for r in draws)
    assert len(draws) == 4000
    assert abs(share[0] / 4000 - 0.75) < 0.03 and abs(share[1] / 4000 - 0.25) < 0.03


def test_all_exhausted_restarts_until_every_source_was_read(tmp_path):
    sources = [Source(numbered(tmp_path, "a", 20)), Source(numbered(tmp_path, "b", 3))]
    drawn = texts(mix(sources, "interleave", 5, "all_exhausted"))
    counts = Counter(drawn)
    assert set(counts) == {f"a{i}" for i in range(20)} | {"b0", "b1", "b2"}
    assert all(counts[f"a{i}"] == 1 for i in range(20))  # the long source is read once
    assert counts["b0"] > 1  # the short one was restarted


def test_first_exhausted_stops_when_the_first_source_runs_out(tmp_path):
    sources = [Source(numbered(tmp_path, "a", 100)), Source(numbered(tmp_path, "b", 5))]
    drawn = texts(mix(sources, "interleave", 0, "first_exhausted"))
    b_rows = [t for t in drawn if t[0] == "b"]
    a_rows = [t for t in drawn if t[0] == "a"]
    assert b_rows == ["b0", "b1", "b2", "b3", "b4"]
    assert a_rows == [f"a{i}" for i in range(len(a_rows))] and 0 < len(a_rows) < 100
    assert len(drawn) == len(set(drawn))  # nothing read twice


def test_all_exhausted_with_an_empty_source_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    sources = [Source(numbered(tmp_path, "a", 5)), Source(str(tmp_path / "empty.jsonl"))]
    with pytest.raises(DataError, match=r"empty\.jsonl holds no rows"):
        list(mix(sources, "interleave", 0, "all_exhausted"))


# ------------------------------------------------------------------ fingerprints


def set_mtime(path, ns):
    os.utime(path, ns=(ns, ns))


def test_fingerprint_follows_content_not_timestamps(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "one"}\n', encoding="utf-8")
    memo = tmp_path / "memo"
    sources = [Source(str(data))]
    assert fingerprint(sources, memo) == fingerprint(sources)
    # a file written moments ago is never memoised: a same-size rewrite within the
    # timestamp's precision would otherwise keep a stale hash
    assert json.loads((memo / "file_hashes.json").read_text()) == {}
    base_ns = data.stat().st_mtime_ns - 100 * 10**9
    set_mtime(data, base_ns)
    first = fingerprint(sources, memo)
    assert fingerprint(sources, memo) == first
    assert len(json.loads((memo / "file_hashes.json").read_text())) == 1

    set_mtime(data, base_ns + 10**9)  # touched, same content
    assert fingerprint(sources, memo) == first
    assert len(json.loads((memo / "file_hashes.json").read_text())) == 2

    data.write_text('{"text": "two"}\n', encoding="utf-8")  # same size, new content
    set_mtime(data, base_ns + 2 * 10**9)
    changed = fingerprint(sources, memo)
    assert changed != first
    assert changed == fingerprint(sources)  # the memo agrees with hashing afresh

    data.write_text('{"text": "three"}\n', encoding="utf-8")
    assert fingerprint(sources, memo) not in (first, changed)


def test_fingerprint_covers_settings_and_every_file_of_a_directory(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "sub.jsonl", [{"text": "b"}])
    base = fingerprint([Source(str(tmp_path))])
    assert fingerprint([Source(str(tmp_path), weight=2)]) != base
    assert fingerprint([Source(str(tmp_path), max_rows=1)]) != base
    write_jsonl(tmp_path / "sub.jsonl", [{"text": "c"}])
    assert fingerprint([Source(str(tmp_path))]) != base
    # hub ids are fingerprinted by name and split, without touching the network
    assert fingerprint([Source("org/set")]) != fingerprint([Source("org/set", split="test")])


# ---------------------------------------------------------- through the data module


def test_weighted_interleaved_sources_in_the_data_module(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [conversation(f"a{i}?", f"A{i}") for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [conversation(f"b{i}?", f"B{i}") for i in range(40)])
    kwargs = dict(
        tokenizer=str(ASSETS),
        train_files=[{"path": str(a), "weight": 3}, Source(str(b), weight=1)],
        mix="interleave",
        stopping="first_exhausted",
        val_split=0,
        cache_dir=None,
        seed=11,
    )
    dm = SFTDataModule(**kwargs)
    assert [(s.path, s.weight) for s in dm.train_sources] == [(str(a), 3), (str(b), 1.0)]
    dm.setup("fit")
    decoded = [dm.tokenizer.decode(ids) for ids in dm.datasets["train"]["input_ids"]]
    from_a = sum("\na" in d for d in decoded)
    from_b = sum("\nb" in d for d in decoded)
    assert from_a == 40 and 0 < from_b < 40  # a (weight 3) runs out first
    assert dm.stats["train"].rows == from_a + from_b == len(decoded)
    assert any("\nb" in d for d in decoded[:20])  # interleaved, not concatenated
    again = SFTDataModule(**kwargs)
    again.setup("fit")
    assert again.datasets["train"]["input_ids"] == dm.datasets["train"]["input_ids"]


def test_plain_ids_take_the_module_hub_settings(tmp_path):
    dm = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files=["org/set", {"path": "org/other", "split": "dev"}],
        hub_config="en",
        hub_split="validation",
        cache_dir=None,
    )
    assert [(s.hub_config, s.split) for s in dm.train_sources] == [
        ("en", "validation"),
        (None, "dev"),
    ]


def test_config_file_parses_train_files_as_sources(monkeypatch, tmp_path):
    from src.cli import cli_main

    monkeypatch.chdir(ROOT)
    a = write_jsonl(tmp_path / "a.jsonl", [conversation("q", "a")])
    entries = [
        {"path": str(a), "weight": 2, "columns": {"messages": "dialog"}},
        {"path": "data/demo/sft_train.jsonl", "max_rows": 5, "format": "messages"},
    ]
    cli = cli_main(
        [
            "--config",
            "configs/sft.yaml",
            "--data.init_args.train_files",
            json.dumps(entries),
            "--data.init_args.mix",
            "interleave",
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    sources = cli.datamodule.train_sources
    assert all(isinstance(s, Source) for s in sources)
    assert sources == [
        Source(str(a), weight=2.0, columns={"messages": "dialog"}),
        Source("data/demo/sft_train.jsonl", max_rows=5, format="messages"),
    ]
    assert cli.datamodule.mix == "interleave"
    # a plain path and a list of paths still parse as before
    parsed = cli.parser.parse_args(
        ["--config", "configs/sft.yaml", "--data.init_args.train_files", '["x.jsonl", "y.csv"]']
    )
    assert parsed.data.init_args.train_files == ["x.jsonl", "y.csv"]
    mixed = cli.parser.parse_args(
        [
            "--config",
            "configs/sft.yaml",
            "--data.init_args.train_files",
            '[{"path": "x.jsonl", "weight": 2}, "y.csv"]',
        ]
    )
    first, second = mixed.data.init_args.train_files
    assert (first.path, first.weight, second) == ("x.jsonl", 2.0, "y.csv")


def test_module_wide_column_mapping_applies_to_sources_without_their_own(tmp_path):
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"dialog": conversation("q", "a")["messages"]}])
    other = write_jsonl(tmp_path / "other.jsonl", [{"chat": conversation("x", "y")["messages"]}])
    dm = SFTDataModule(
        tokenizer=str(ASSETS),
        train_files=[str(mine), Source(str(other), columns={"messages": "chat"})],
        columns={"messages": "dialog"},
        val_split=0,
        cache_dir=None,
    )
    assert [s.columns for s in dm.train_sources] == [{"messages": "dialog"}, {"messages": "chat"}]
    dm.setup("fit")
    assert dm.stats["train"].examples == 2
