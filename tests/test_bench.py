"""The training benchmarks run end to end in a smoke mode and print what they promise.

Only the report's shape and its correctness checks are asserted (same batches, same
initial weights, same tokens as TRL), never a timing: timings belong to the benchmarks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

RATIO = r"\d+\.\d+(?: \(\d+\.\d+ to \d+\.\d+\))?x"
VERDICT = r"(?:met|NOT met)"


def run_bench(script: str, *args: str, tmp_path) -> tuple[str, dict]:
    out = tmp_path / "results.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.heavy
def test_train_bench_smoke(tmp_path):
    stdout, results = run_bench(
        "train.py",
        *("--max-length", "256", "--batch-size", "2", "--steps", "3", "--warmup", "1"),
        *("--repeats", "1"),
        tmp_path=tmp_path,
    )
    # the paths trained on comparable tokens, from the same weights
    first = "first conversation: token ids ours == TRL: True; trained positions ours == TRL: True"
    assert first in stdout
    assert "ours and bare trained on the same batches: True" in stdout
    assert "every path started from the same weights (checksum): True" in stdout
    packing = re.search(
        r"packing: ours (\d+) rows .*TRL (\d+) rows .* (\d+) tokens \((\d+) trained\)", stdout
    )
    assert packing, stdout
    data = re.search(r"(\d+) conversations, (\d+) tokens \((\d+) trained\)", stdout)
    assert data and packing.group(3) == data.group(2) and packing.group(4) == data.group(3)
    for path in ("ours", "TRL", "bare", "ours, padding_free"):
        assert re.search(rf"^  {re.escape(path)}: real tokens \[\d+, \d+\]", stdout, re.M)
    # the table and the verdicts
    assert "| path | real tokens/s (median of 1) | ratio to TRL |" in stdout
    for label in (
        "| ours: Lightning fit",
        "| TRL 1.",
        "| bare PyTorch loop",
        "| ours, padding_free",
    ):
        assert re.search(rf"^{re.escape(label)}.* \| [\d,]+ \| \d+\.\d\dx \|", stdout, re.M), label
    assert re.search(rf"^ours/TRL real tokens/s: {RATIO} .*target >= 1.0: {VERDICT}$", stdout, re.M)
    assert re.search(
        rf"^our overhead over the bare loop .*; target <= 5 %: {VERDICT}$", stdout, re.M
    )
    assert set(results["wall"]["rates"]) == {"ours", "TRL", "bare", "ours, padding_free"}
    assert len(results["wall"]["ratio_ours_trl"]) == 1
    assert set(results["targets_met"]) == {"ratio_1_0", "overhead_5pct"}


@pytest.mark.heavy
def test_dpo_bench_smoke(tmp_path):
    stdout, results = run_bench(
        "dpo.py",
        *("--batch-size", "4", "--steps", "3", "--warmup", "1", "--repeats", "1"),
        *("--memory-model", "tiny", "--memory-steps", "2", "--memory-repeats", "1"),
        tmp_path=tmp_path,
    )
    check = re.search(
        r"token ids of the (\d+) sequences: equal in \d+; "
        r"TRL's = ours \+ the newline .* in (\d+)",
        stdout,
    )
    assert check and check.group(1) == check.group(2), stdout  # every response, one token more
    assert "both started from the same base weights (checksum): True" in stdout
    assert "ours: a reference copy: False, TRL: a reference model: False" in stdout
    for path in ("ours", "TRL"):
        assert re.search(rf"^  {path}: pairs \[4, 4\]", stdout, re.M)
    assert "| path | pairs/s (median of 1) | ratio to TRL |" in stdout
    assert re.search(rf"^ours/TRL pairs/s: {RATIO} .*target >= 1.0: {VERDICT}$", stdout, re.M)
    # memory: two fresh processes on the same batches, and the ratio with its verdict
    assert "same batches: True" in stdout
    for label in ("| SFT, LoRA |", "| DPO sigmoid, LoRA, reference = no adapters |"):
        assert re.search(rf"^{re.escape(label)} [\d,]+ \| [\d,]+ \| -?[\d,]+ \|$", stdout, re.M)
    assert re.search(
        rf"^DPO/SFT peak memory, weights included: \d+\.\d+x; target <= 1.15x: {VERDICT}",
        stdout,
        re.M,
    )
    memory = results["memory"]
    assert len(memory["runs"]["sft"]) == len(memory["runs"]["dpo"]) == 1
    dpo = memory["runs"]["dpo"][0]
    assert dpo["trainable"] < dpo["params"]  # LoRA: the base is frozen
    assert memory["ratio_peak"] > 0


@pytest.mark.heavy
def test_memory_bench_smoke(tmp_path):
    stdout, results = run_bench("memory.py", "--smoke", tmp_path=tmp_path)
    cells = r" \| [\d.]+ \| [\d.]+ \| [\d.]+x"  # full, lean, lean/full
    row = rf"\| smoke \| (sft|dpo) \| 64{cells}{cells} \| True \|"
    assert sorted(re.findall(row, stdout)) == ["dpo", "sft"], stdout
    for head in results["head"]:  # each path in its own process, the same loss
        assert head["same_loss"] and head["loss"]["full"] > 0
    assert re.search(rf"^lean/full step peak at 64 tokens, worst: .*: {VERDICT}$", stdout, re.M)
    assert (
        "lean and full agree (1e-5 relative; SFT: the loss, DPO: the log-prob sums) in every "
        "row: True" in stdout
    )
    packed = results["packed"]["efficiency"]
    assert packed["packed"] > packed["padded"]  # the same pairs, fewer pad positions
    assert re.search(rf"^packed/padded pairs/s: {RATIO}; target >= 1.3x: {VERDICT}$", stdout, re.M)


def test_data_bench_on_a_users_alpaca_file(tmp_path):
    rows = [
        {
            "instruction": f"Summarise point {i} of the report.",
            "input": "The river rose in spring. " * (i % 4) if i % 3 else "",
            "output": "It rose, as rivers do in spring. " * (1 + i % 5),
            **({"system": "You are terse."} if i % 4 == 0 else {}),
        }
        for i in range(40)
    ]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stdout, results = run_bench(
        "data.py",
        *("--file", str(data), "--format", "alpaca", "--max-length", "256", "--repeats", "1"),
        tmp_path=tmp_path,
    )
    assert f"40 rows of {data} (40 alpaca; format alpaca), 40 with something to train on" in stdout
    assert "| path | examples/s | padding efficiency | trained tokens |" in stdout
    assert re.search(r"^ratio ours/TRL examples/s: \d+\.\d\dx .*target >= 1\.5x: ", stdout, re.M)
    assert re.search(r"^first example: token ids ours == TRL: True", stdout, re.M)
    assert "same multiset of sequence lengths in both packed sets: True" in stdout
    assert "trained tokens TRL - ours = 40 (untruncated examples: 40; equal)" in stdout
    assert (results["file"], results["format"], results["n"], results["examples"]) == (
        str(data),
        "alpaca",
        40,
        40,
    )
    assert results["first_example_ids_agree"] and results["same_sequence_lengths"]
