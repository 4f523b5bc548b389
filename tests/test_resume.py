"""Exact mid-epoch resume: a run interrupted after optimizer step k and resumed from its
``last.ckpt`` sees the same batches and logs bitwise the same losses at steps k+1..n as a
run that was never interrupted (padded, packed and streamed data, gradient accumulation)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from src.callbacks.checkpoint import RunCheckpoint
from src.datamodules import SFTDataModule
from src.modules import SFTModule
from tests.conftest import conversation, write_jsonl

WORDS = ("red", "fox", "blue", "bird", "green", "hills", "quick")
WORDS += ("brown", "dog", "jumps", "over", "lazy", "cat", "sleeps")


class Interrupted(Exception):
    """Stands for a crash (or a pre-empted job) right after a checkpoint was written."""


class StepRecorder(pl.Callback):
    """Every micro-batch's ``input_ids`` and every optimizer step's ``train/loss``, by step."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.crash_after = crash_after
        self.batches: dict[int, list[torch.Tensor]] = {}
        self.losses: dict[int, float] = {}
        self._step_at_start = -1
        self.validations = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.crash_after is not None and trainer.global_step >= self.crash_after:
            raise Interrupted(f"stopped after step {trainer.global_step}")
        self._step_at_start = trainer.global_step
        self.batches.setdefault(trainer.global_step + 1, []).append(batch["input_ids"].clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step_at_start:  # this micro-batch ended a step
            self.losses[trainer.global_step] = trainer.callback_metrics["train/loss"].item()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validations += 1


def rows(n: int) -> list[dict]:
    """Conversations of varied lengths (so that shuffling, padding and packing matter)."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 5) % 11)]
        out.append(conversation(f"Example {i}: reverse {' '.join(words)}", " ".join(words[::-1])))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy shared CPU, idle OpenMP threads spin and a step of
    this tiny model takes a second instead of milliseconds (results are the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("resume") / "train.jsonl", rows(24))


def make_data(train_file: Path, micro_model_dir: Path, **kwargs) -> SFTDataModule:
    options = {"val_split": 0.0, "batch_size": 2, "max_length": 128, "seed": 7}
    options.update(kwargs)
    return SFTDataModule(
        tokenizer=str(micro_model_dir), train_files=str(train_file), cache_dir=None, **options
    )


def fit(
    data_kwargs: dict,
    trainer_kwargs: dict,
    paths: tuple[Path, Path, Path],
    max_steps: int,
    crash_after: int | None = None,
    ckpt_path: str | None = None,
) -> tuple[StepRecorder, SFTModule, pl.Trainer]:
    """One fit with the same configuration every time; only the interruption differs."""
    train_file, model_dir, ckpt_dir = paths
    pl.seed_everything(1234)
    data = make_data(train_file, model_dir, **data_kwargs)
    module = SFTModule(
        model_name_or_path=str(model_dir),
        from_scratch=True,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        scheduler="cosine",
        warmup=2,
    )
    recorder = StepRecorder(crash_after)
    checkpoint = RunCheckpoint(
        dirpath=ckpt_dir, save_last=True, every_n_train_steps=1, save_top_k=0
    )
    options = {"limit_val_batches": 0, **trainer_kwargs}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, checkpoint],
        **options,
    )
    if crash_after is None:
        trainer.fit(module, data, ckpt_path=ckpt_path)
    else:
        with pytest.raises(Interrupted):
            trainer.fit(module, data, ckpt_path=ckpt_path)
    return recorder, module, trainer


def assert_exact_resume(
    data_kwargs: dict,
    paths: tuple[Path, Path],
    tmp_path: Path,
    stops: list[int],
    n: int,
    steps_per_epoch: int | None = None,
    **trainer_kwargs,
) -> StepRecorder:
    """Runs interrupted after each step of ``stops`` (each resumed from ``last.ckpt``), then
    resumed to ``n``, see the batches and log the losses of one uninterrupted run to ``n``
    (whose recorder is returned)."""
    full, full_module, full_trainer = fit(
        data_kwargs, trainer_kwargs, (*paths, tmp_path / "full"), n
    )
    assert sorted(full.losses) == list(range(1, n + 1))
    if steps_per_epoch is not None:  # the interruptions fall where the test means them to
        accumulate = trainer_kwargs.get("accumulate_grad_batches", 1)
        assert -(-full_trainer.num_training_batches // accumulate) == steps_per_epoch
    assert len({tuple(b[0].flatten().tolist()) for b in full.batches.values()}) > n // 2

    last = tmp_path / "run" / "last.ckpt"
    pieces: list[tuple[range, StepRecorder]] = []
    start = 0
    for stop in [*stops, None]:
        recorder, module, _ = fit(
            data_kwargs,
            trainer_kwargs,
            (*paths, tmp_path / "run"),
            n,
            crash_after=stop,
            ckpt_path=str(last) if start else None,
        )
        end = n if stop is None else stop
        assert sorted(recorder.losses) == list(range(start + 1, end + 1))
        assert sorted(recorder.batches) == list(range(start + 1, end + 1))
        if stop is not None:
            assert torch.load(last, weights_only=False)["global_step"] == stop
        pieces.append((range(start + 1, end + 1), recorder))
        start = end

    for steps, recorder in pieces:
        for step in steps:
            seen, expected = recorder.batches[step], full.batches[step]
            assert len(seen) == len(expected), f"step {step}: another number of micro-batches"
            for a, b in zip(seen, expected, strict=True):
                assert torch.equal(a, b), f"step {step}: not the uninterrupted run's batch"
            loss = recorder.losses[step]
            assert loss == full.losses[step], f"step {step}: {loss!r} != {full.losses[step]!r}"
    final, expected = module.model.state_dict(), full_module.model.state_dict()
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    return full


@pytest.fixture
def paths(train_file, micro_model_dir) -> tuple[Path, Path]:
    return train_file, micro_model_dir


# 24 rows, batch 2: 12 batches (= optimizer steps) per epoch, reshuffled every epoch
@pytest.mark.parametrize(
    ("stops", "n"),
    [([5], 9), ([5, 14], 18), ([12], 15)],
    ids=["mid-epoch", "twice-across-epochs", "at-epoch-end"],
)
def test_padded_shuffled_resume_is_exact(paths, tmp_path, stops, n):
    full = assert_exact_resume({}, paths, tmp_path, stops, n, steps_per_epoch=12)
    if n > 12:  # the second epoch has an order of its own
        assert any(
            not torch.equal(full.batches[s][0], full.batches[s + 12][0]) for s in range(1, n - 11)
        )


def test_packed_resume_is_exact(paths, tmp_path):
    kwargs = {"packing": True, "max_length": 48, "batch_size": 1}
    data = make_data(*paths, **kwargs)
    data.setup("fit")
    rows_per_epoch = len(data.datasets["train"])
    assert 8 <= rows_per_epoch < 24  # several examples to a row, and a few rows per epoch
    assert_exact_resume(kwargs, paths, tmp_path, [3], 7, steps_per_epoch=rows_per_epoch)


# 22 streamed rows (2 held out for validation), batch 2: 11 steps a pass of the stream
@pytest.mark.parametrize(
    ("stops", "n"), [([4, 5], 14), ([11], 14)], ids=["twice-mid-pass", "at-pass-end"]
)
def test_streamed_resume_is_exact(paths, tmp_path, stops, n):
    kwargs = {"streaming": True, "val_split": 2}
    assert_exact_resume(kwargs, paths, tmp_path, stops, n)


def test_streamed_resume_with_limited_epochs_is_exact(paths, tmp_path):
    """With ``limit_train_batches`` the loader has a length and Lightning fetches no batch
    ahead: the state saved must then be the loader's own."""
    kwargs = {"streaming": True, "val_split": 2}
    assert_exact_resume(kwargs, paths, tmp_path, [3, 7], 9, limit_train_batches=5)


def test_resume_is_exact_with_validation_between_steps(paths, tmp_path):
    """Validation every 3 steps (on the held-out rows) leaves the training stream alone."""
    kwargs = {"streaming": True, "val_split": 2}
    full = assert_exact_resume(
        kwargs, paths, tmp_path, [4], 9, val_check_interval=3, limit_val_batches=1
    )
    assert full.validations == 3


@pytest.mark.parametrize(
    ("data_kwargs", "stops", "n", "steps_per_epoch"),
    [
        ({}, [2], 8, 6),  # 12 micro-batches an epoch, 2 a step: 6 steps
        ({"packing": True, "max_length": 48, "batch_size": 1}, [2], 5, None),
        ({"streaming": True, "val_split": 2}, [3], 8, None),  # 11 micro-batches a pass
    ],
    ids=["padded", "packed", "streamed"],
)
def test_accumulated_resume_mid_epoch_is_exact(
    paths, tmp_path, data_kwargs, stops, n, steps_per_epoch
):
    assert_exact_resume(
        data_kwargs,
        paths,
        tmp_path,
        stops,
        n,
        steps_per_epoch=steps_per_epoch,
        accumulate_grad_batches=2,
    )


@pytest.mark.parametrize("streaming", [False, True], ids=["padded", "streamed"])
def test_resume_with_loader_workers_is_exact(paths, tmp_path, streaming):
    kwargs = {"num_workers": 1, "streaming": streaming, "val_split": 2 if streaming else 0.0}
    assert_exact_resume(kwargs, paths, tmp_path, [4], 13)


def _position(yielded: int, single_process: bool = False) -> dict:
    state = {"samples_yielded": yielded}
    if single_process:
        state["sampler_iter_state"] = {"yielded": yielded, "generator": "..."}
    loader = {"_sampler_iter_state": state, "_num_yielded": 1}
    return {"loops": {"fit_loop": {"state_dict": {"combined_loader": [loader]}}}}


def test_data_position_moves_to_another_process_count():
    from src.checkpoint_io import move_data_position

    checkpoint = {**_position(6), "data_parallel_size": 2}  # 6 per rank: 12 used
    move_data_position(checkpoint, 4)
    loader = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["_sampler_iter_state"]["samples_yielded"] == 3
    same = {**_position(6), "data_parallel_size": 2}
    move_data_position(same, 2)
    assert same["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["_sampler_iter_state"] == {
        "samples_yielded": 6
    }
    unrecorded = _position(6)  # written before the count was recorded: left as it is
    move_data_position(unrecorded, 1)
    assert unrecorded == _position(6)


def test_data_position_that_cannot_move_is_refused():
    from src.checkpoint_io import move_data_position
    from src.errors import ResumeError

    with pytest.raises(ResumeError, match="used 6 examples of this epoch, which 4 processes"):
        move_data_position({**_position(3), "data_parallel_size": 2}, 4)
    with pytest.raises(ResumeError, match="one process without a distributed sampler"):
        move_data_position({**_position(4, single_process=True), "data_parallel_size": 1}, 2)
