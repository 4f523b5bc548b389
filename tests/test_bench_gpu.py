"""bench/gpu.py runs its grid end to end (a tiny model on the CPU): one row per setting."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def test_gpu_benchmark_smoke_run_fills_its_table():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu.py"),
            "--smoke",
            "--attn",
            "sdpa",
            "--compile",
            "0",
            "--checkpointing",
            "0",
            "--lm-head",
            "lean",
            "full",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| (sft|dpo) \|", line)]
    table = rows[len(rows) // 2 :]  # printed as they finish, then again as the table
    assert len(table) == 4  # sft and dpo, with the lean and the full head
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "failed" not in row and float(cells[6].replace(",", "")) > 0, row
    assert sorted(row.split("|")[6].strip() for row in table) == ["full", "full", "lean", "lean"]
