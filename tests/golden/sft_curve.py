"""The first optimizer steps of the demo SFT (configs/sft.yaml), as numbers to compare against.

``tests/golden/test_sft_curve.py`` reruns them and compares ``train/loss`` step by step with
``sft_first_10_steps.json`` at rtol 1e-4. After a deliberate change to the training numerics
(model init, data order, loss, optimizer), regenerate the file and commit it:

    python -m tests.golden.sft_curve --write

Run from the repository root: the run uses the tree of the ``src`` Python imports, its code,
configs, assets and data. Without ``--write`` it prints the record instead.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 10
GOLDEN = Path(__file__).with_name(f"sft_first_{STEPS}_steps.json")
COMMAND = "python -m tests.golden.sft_curve --write"

# What differs from `python train.py fit --config configs/sft.yaml`: the length, a loss per
# step, and no validation, samples, checkpoints or export (with them the losses are the same:
# the model is initialised and the data shuffled the same way). No data cache, so the data are
# prepared by the code under test rather than loaded from an earlier run's cache.
OVERRIDES = [
    f"--trainer.max_steps={STEPS}",
    "--trainer.log_every_n_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--checkpoint.save_last=false",
    "--trainer.callbacks=[]",
    "--data.cache_dir=null",
]


def root() -> Path:
    """The tree whose ``src`` is imported: its configs/, assets/ and data/ are the ones run."""
    import src

    return Path(src.__file__).resolve().parents[1]


def fit_args(save_dir: Path) -> list[str]:
    return [
        "fit",
        "--config=configs/sft.yaml",
        *OVERRIDES,
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]


def run(save_dir: Path) -> list[float]:
    """``train/loss`` of each of the first ``STEPS`` optimizer steps, one torch thread."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from src.cli import cli_main

    threads, here = torch.get_num_threads(), Path.cwd()
    torch.set_num_threads(1)  # a reduction over more threads may sum in another order
    os.chdir(root())  # the config names assets/ and data/ relative to the repository root
    try:
        cli_main(fit_args(save_dir))
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    losses: dict[int, float] = {}
    for path in sorted(glob.glob(str(save_dir / "sft" / "version_0" / "events.out.tfevents.*"))):
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            losses |= {e.step: e.value for e in events.Scalars("train/loss")}
    return [losses[step] for step in sorted(losses)]


def versions() -> dict[str, str]:
    import lightning
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
    }


def record(losses: list[float]) -> dict:
    tree = root()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "what": f"train/loss of the first {STEPS} optimizer steps of configs/sft.yaml "
        "(seed 42, tiny Llama from assets/tiny-llama, data/demo), torch.set_num_threads(1), CPU",
        "regenerate": COMMAND,
        "cli_args": fit_args(Path("<tmp>")),
        "commit": commit or "unknown",
        "versions": versions(),
        "train/loss": losses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN.name}")
    parser.add_argument("--out", type=Path, default=GOLDEN, help="where --write writes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        losses = run(Path(tmp))
    result = record(losses)
    text = json.dumps(result, indent=2) + "\n"
    if args.write:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
