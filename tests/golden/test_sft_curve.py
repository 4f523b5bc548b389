"""A fresh run of the demo SFT's first optimizer steps gives the committed losses (rtol 1e-4)."""

from __future__ import annotations

import json
import math

import pytest

from tests.golden.sft_curve import COMMAND, GOLDEN, run, versions

RTOL = 1e-4


@pytest.mark.slow
def test_first_steps_match_the_golden_curve(tmp_path):
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    want = golden["train/loss"]
    got = run(tmp_path)
    assert len(got) == len(want), (
        f"{len(got)} train/loss values logged, {GOLDEN.name} has {len(want)}"
    )
    moved = [
        f"step {step}: {w:.6f} -> {g:.6f}"
        for step, (w, g) in enumerate(zip(want, got, strict=True), start=1)
        if not math.isclose(g, w, rel_tol=RTOL)
    ]
    if moved:
        now, then = versions(), golden["versions"]
        changed = [f"{k} {then.get(k)} -> {v}" for k, v in now.items() if then.get(k) != v]
        pytest.fail(
            f"train/loss of the demo SFT moved (rtol {RTOL}) at optimizer "
            + "; ".join(moved)
            + (f". Versions differ from the golden run's: {', '.join(changed)}" if changed else "")
            + f". A regression unless the change was deliberate; then regenerate {GOLDEN.name} "
            f"with `{COMMAND}` and commit it (it records the commit and versions it came from)."
        )
