"""What a newcomer's first mistakes print: one line in our words, naming the key, the allowed
values and what to do (a "did you mean" for a near miss), exit status 1, never a traceback
nor jsonargparse's dumps of ``Namespace(...)`` values.

A few cases run ``train.py`` in a process of their own, one of each way an error reaches the
terminal (a machine check, a parser error, a missing path, a resume with nothing to resume),
started together; the others raise the same words from ``cli_main`` in this process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from src.callbacks.progress import StepRichProgressBar, StepTQDMProgressBar
from src.cli import cli_main
from src.compat import lightning_has_rich
from src.errors import ConfigError
from tests.conftest import ROOT

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without")
DPO, SFT = "configs/dpo.yaml", "configs/sft.yaml"


def missing(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is not None, reason=f"{module} is installed"
    )


# case -> the command line after ``python train.py``: run by train.py itself
CASES: dict[str, list[str]] = {
    "gpu_preset": ["fit", "--config", SFT, "--trainer", "configs/trainer/gpu.yaml"],
    "key_typo_dpo": ["fit", "--config", DPO, "--model.init_args.betaa", "0.1"],
    "tokenizer": ["fit", "--config", SFT, "--data.init_args.tokenizer", "tiny-lama"],
    "ckpt_last": ["fit", "--config", SFT, "--ckpt_path", "last"],
}  # fmt: skip
# ... and raised in this process: the same handling, the line after "config error: "
IN_PROCESS: dict[str, list[str]] = {
    "no_deepspeed": [
        "--config", SFT, "--trainer", "configs/trainer/deepspeed_zero3.yaml",
        "--trainer.accelerator", "cpu",
    ],
    "no_liger": ["--config", SFT, "--model.init_args.liger_kernels", "true"],
    "qlora": [
        "--config", SFT, "--config", "configs/peft/lora.yaml",
        "--model.init_args.lora.load_in_4bit", "true", "--model.init_args.from_scratch", "false",
    ],
    "key_typo_sft": ["--config", SFT, "--model.init_args.betaa", "0.1"],
    "loss_type": ["--config", DPO, "--model.init_args.loss_type", "sigmoidd"],
    "trainer_key": ["--config", SFT, "--trainer.max_stepz", "10"],
    "batch_size_0": ["--config", SFT, "--data.init_args.batch_size", "0"],
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, Future]:
    """The selected cases' processes, started at once."""
    tmp = tmp_path_factory.mktemp("config-errors")
    selected = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        module = getattr(item, "module", None)
        if module is not None and module.__name__ == __name__ and callspec is not None:
            selected.add(callspec.params.get("case"))
    selected &= set(CASES)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))

    def run(args: list[str]) -> subprocess.CompletedProcess:
        # nothing is written; were it, not into the repository's runs/ (and `last` finds none)
        args = [*args, "--trainer.logger.init_args.save_dir", str(tmp / "runs")]
        return subprocess.run(
            [sys.executable, "train.py", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip

    futures = {case: pool.submit(run, CASES[case]) for case in sorted(selected)}
    yield futures
    pool.shutdown(wait=True)


def error_line(runs: dict[str, Future], case: str, prefix: str = "config error: ") -> str:
    """The one line a case printed, checked to be the whole of the error (a case of
    ``IN_PROCESS``: the words ``cli_main`` raises, after the same prefix)."""
    if case in IN_PROCESS:  # a step at most, written nowhere that matters, were it to train
        out = tempfile.mkdtemp()
        limits = ("--trainer.max_steps", "1", "--trainer.logger.init_args.save_dir", out)
        return prefix + config_error("fit", *IN_PROCESS[case], *limits, run=True)
    done = runs[case].result()
    assert done.returncode == 1, done.stderr[-3000:]
    for dump in ("Traceback", "Namespace(", "NestedArg(", "usage:", "Subtypes:"):
        assert dump not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(prefix), done.stderr[-3000:]
    # the lines before it are the run's log (the seed), not more of the error
    assert all("error" not in line.lower() for line in lines[:-1]), done.stderr
    return lines[-1]


# ------------------------------------------------------------ the machine
def gpu_preset_message(preset: str) -> tuple[str, str]:
    return (
        f"the {preset} preset (configs/trainer/{preset}.yaml) needs a CUDA GPU and none is "
        "visible (",
        "); use --trainer configs/trainer/cpu.yaml (or leave --trainer out: the objective "
        "configs use accelerator: auto)",
    )


@NO_GPU
@pytest.mark.parametrize("case, preset", [("gpu_preset", "gpu")])
def test_a_gpu_preset_without_a_gpu_says_so_and_what_to_use(runs, case, preset):
    line = error_line(runs, case)
    start, end = gpu_preset_message(preset)
    assert line.startswith(f"config error: {start}") and line.endswith(end)


def config_error(*args: str, run: bool = False) -> str:
    """What ``cli_main`` raises for ``args`` (the words train.py prints after "config error:")."""
    with pytest.raises(ConfigError) as raised:
        cli_main(list(args), run=run)
    return str(raised.value)


@NO_GPU
@pytest.mark.parametrize(
    "preset", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"]
)
def test_every_gpu_preset_says_so(preset):
    line = config_error("--config", SFT, "--trainer", f"configs/trainer/{preset}.yaml")
    start, end = gpu_preset_message(preset)
    assert line.startswith(start) and line.endswith(end)


@NO_GPU
def test_a_gpu_accelerator_without_a_gpu_names_the_key():
    line = config_error("--config", SFT, "--trainer.accelerator", "gpu")
    assert line.startswith("trainer.accelerator gpu needs a CUDA GPU and none is visible (")
    assert line.endswith("use --trainer configs/trainer/cpu.yaml (or --trainer.accelerator auto)")


@missing("deepspeed")
@pytest.mark.parametrize("case", ["no_deepspeed"])
def test_deepspeed_without_the_package_names_the_extra(runs, case):
    assert error_line(runs, case) == (
        "config error: the deepspeed_zero3 preset (configs/trainer/deepspeed_zero3.yaml) needs "
        "the deepspeed package, which is not installed: pip install -e '.[deepspeed]'"
    )


@missing("liger_kernel")
@pytest.mark.parametrize("case", ["no_liger"])
def test_liger_kernels_without_the_package_name_it(runs, case):
    assert error_line(runs, case) == (
        "config error: model.init_args.liger_kernels: true needs the liger-kernel package, "
        "which is not installed: pip install liger-kernel; or set it to false"
    )


@pytest.mark.skipif(
    torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None,
    reason="QLoRA can run here",
)
@pytest.mark.parametrize("case", ["qlora"])
def test_qlora_names_what_the_machine_lacks(runs, case):
    line = error_line(runs, case)
    assert line.startswith("config error: QLoRA (model.init_args.lora.load_in_4bit: true) needs ")
    if not torch.cuda.is_available():
        assert "a CUDA GPU, and none is visible (" in line
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "the bitsandbytes package, which is not installed: pip install -e '.[qlora]'" in line
    assert line.endswith("; or train plain LoRA (load_in_4bit: false)")


# -------------------------------------------------------- keys and values
@pytest.mark.parametrize("case", ["key_typo_dpo"])
def test_a_misspelled_key_gets_a_did_you_mean_and_the_options(runs, case):
    line = error_line(runs, case)
    assert line.startswith(
        "config error: model.init_args.betaa: no such option of src.modules.DPOModule; "
        "did you mean beta? (its options: loss_type, beta, label_smoothing, gamma, "
    )
    assert line.endswith(", liger_kernels, lm_head, lm_head_chunk_size)")


@pytest.mark.parametrize("case", ["key_typo_sft"])
def test_an_option_of_another_objective_is_pointed_to(runs, case):
    line = error_line(runs, case)
    assert line.startswith(
        "config error: model.init_args.betaa: no such option of src.modules.SFTModule "
        "(beta is an option of src.modules.DPOModule) (its options: label_smoothing, "
    )


@pytest.mark.parametrize("case", ["loss_type"])
def test_an_unknown_loss_type_lists_the_loss_types(runs, case):
    assert error_line(runs, case) == (
        "config error: model.init_args.loss_type: 'sigmoidd' is not one of sigmoid, ipo, hinge, "
        "robust, simpo, orpo; did you mean sigmoid?"
    )


TRAINER_TYPO = (
    "trainer.max_stepz: no such option of trainer; did you mean max_steps? "
    "(its options: accelerator, strategy, devices, "
)


@pytest.mark.parametrize("case", ["trainer_key"])
def test_a_misspelled_trainer_key(runs, case):
    line = error_line(runs, case)
    assert line.startswith(f"config error: {TRAINER_TYPO}") and " max_steps, " in line


def test_a_misspelled_key_in_a_config_file(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_stepz: 10\n", encoding="utf-8")
    assert config_error("--config", DPO, "--config", str(typo)).startswith(TRAINER_TYPO)
    typo.write_text("model:\n  init_args:\n    loss_type: sigmoidd\n", encoding="utf-8")
    assert config_error("--config", DPO, "--config", str(typo)) == (
        "model.init_args.loss_type: 'sigmoidd' is not one of sigmoid, ipo, hinge, robust, simpo, "
        "orpo; did you mean sigmoid?"
    )
    typo.write_text("model: [\n", encoding="utf-8")
    assert config_error("--config", DPO, "--config", str(typo)).startswith(
        f"{typo} is not valid YAML: "
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--model.init_args.lora.rr", "8"],
            "model.init_args.lora.rr: no such option of src.modules.LoraSettings; did you mean r? "
            "(its options: r, alpha, dropout, target_modules, use_dora, use_rslora, "
            "adapter_path, load_in_4bit, merge, modules_to_save)",
        ),
        (
            ["--model.init_args.optimizer.init_args.lrr", "0.1"],
            "model.init_args.optimizer.init_args.lrr: no such option of torch.optim.AdamW; did "
            "you mean lr? (its options: lr, betas, eps, weight_decay, amsgrad, maximize, "
            "foreach, capturable, differentiable, fused)",
        ),
        (
            ["--data.init_args.batch_size", "many"],
            "data.init_args.batch_size: expected an integer, got 'many'",
        ),
        (
            ["--data.init_args.train_on", "assistants"],
            "data.init_args.train_on: 'assistants' is not one of assistant, last_assistant, all; "
            "did you mean assistant?",
        ),
        (
            ["--model", "src.modules.SFTModul"],
            "model: no class SFTModul in src.modules; did you mean src.modules.SFTModule? "
            "(src.modules has CausalLMModule, DistillationModule, DPOModule, GRPOModule, "
            "KTOModule, PretrainModule, RewardModule, SFTModule)",
        ),
        (
            ["--trainer", "configs/trainer/gpux.yaml"],
            "--trainer configs/trainer/gpux.yaml: no such file; "
            "did you mean configs/trainer/gpu.yaml?",
        ),
        (
            ["--data.init_args.val_batch_size", "many"],
            "data.init_args.val_batch_size: expected an integer or null, got 'many'",
        ),
        (
            ["--trainer.precision", "bf17"],
            "trainer.precision: expected one of 64, 32, 16, transformer-engine, "
            "transformer-engine-float16, 16-true, 16-mixed, bf16-true, bf16-mixed, 32-true, "
            "64-true, bf16 or null, got 'bf17'; did you mean bf16?",
        ),
        (["--data.init_args.batch_size"], "--data.init_args.batch_size needs a value"),
    ],
)
def test_other_mistakes_name_the_key_and_what_it_takes(args, expected):
    assert config_error("--config", SFT, *args) == expected


def test_a_misspelled_config_file_or_subcommand():
    assert config_error("--config", "configs/sftt.yaml") == (
        "--config configs/sftt.yaml: no such file; did you mean configs/sft.yaml?"
    )
    assert config_error("fitt", "--config", SFT, run=True) == (
        "no subcommand fitt; did you mean fit? "
        "(python train.py fit|validate|test|predict --config configs/sft.yaml)"
    )


# ------------------------------------------------- paths, resume, values
@pytest.mark.parametrize("case", ["tokenizer"])
def test_a_tokenizer_that_is_neither_local_nor_on_the_hub(runs, case):
    assert error_line(runs, case, prefix="error: ") == (
        "error: tokenizer not found: tiny-lama (data.init_args.tokenizer): no such local "
        "directory, and the hub is off (HF_HUB_OFFLINE=1) and holds no cached copy; "
        "did you mean assets/tiny-llama?"
    )


@pytest.mark.parametrize("case", ["ckpt_last"])
def test_resuming_the_last_run_when_there_is_none(runs, case):
    line = error_line(runs, case, prefix="error: ")
    assert line.startswith("error: --ckpt_path last: no ")
    assert line.endswith("/sft/version_*/checkpoints/last.ckpt to resume")


@pytest.mark.parametrize("case", ["batch_size_0"])
def test_a_batch_size_of_zero(runs, case):
    assert (
        error_line(runs, case)
        == "config error: data.init_args.batch_size must be at least 1, got 0"
    )


def test_from_python_a_mistake_raises_the_same_words():
    with pytest.raises(ConfigError) as raised:
        cli_main(["--config", DPO, "--model.init_args.loss_type", "sigmoidd"], run=False)
    assert str(raised.value).startswith("model.init_args.loss_type: 'sigmoidd' is not one of ")


# ------------------------------------------------------------ progress bar
class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.weight * batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_with(bar, tmp_path, **limits) -> str:
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **limits,
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=1))
    return bar.train_bar_text


@pytest.mark.parametrize("bar", [StepRichProgressBar, StepTQDMProgressBar])
def test_a_step_bounded_run_shows_steps_not_epoch_minus_two(bar, tmp_path):
    if bar is StepRichProgressBar and not lightning_has_rich():
        pytest.skip("rich is not installed")
    # 4 batches an epoch: step 6 is in the second epoch (Lightning's bar: "Epoch 1/-2")
    assert fit_with(bar(), tmp_path, max_steps=6) == "step 6/6 (epoch 1)"


@pytest.mark.parametrize("bar", [StepRichProgressBar, StepTQDMProgressBar])
def test_an_epoch_bounded_run_reads_as_lightning_s(bar, tmp_path):
    if bar is StepRichProgressBar and not lightning_has_rich():
        pytest.skip("rich is not installed")
    expected = "Epoch 1/1" if bar is StepRichProgressBar else "Epoch 1"
    assert fit_with(bar(), tmp_path, max_epochs=2) == expected


def cli_trainer(*extra: str) -> pl.Trainer:
    args = ["--config", SFT, "--trainer.logger", "false", *extra]
    return cli_main(args, run=False).trainer


def test_every_run_gets_the_step_bar_unless_its_config_names_one():
    expected = StepRichProgressBar if lightning_has_rich() else StepTQDMProgressBar
    assert type(cli_trainer().progress_bar_callback) is expected
    own = cli_trainer("--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar")
    assert type(own.progress_bar_callback) is TQDMProgressBar
    assert cli_trainer("--trainer.enable_progress_bar", "false").progress_bar_callback is None
