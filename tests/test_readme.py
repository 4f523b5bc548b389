"""The README says what the tree holds and its commands run: checked, so it cannot drift."""

from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from src.tune import TUNE_COMMANDS
from src.tune import parser as tune_parser
from tests.conftest import ASSETS, ROOT

README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def fenced_blocks(lang: str | None = None) -> list[str]:
    return [body for tag, body in FENCE.findall(TEXT) if lang is None or tag == lang]


# ---------------------------------------------------------------------------------- layout
LISTED_KINDS = (".py", ".yaml", ".json", ".sh", ".sbatch")
SUFFIXES = (*LISTED_KINDS, ".md", ".toml", ".txt", ".jsonl", ".jinja")
NAME = re.compile(r"(?<![\w./-])([\w.-]+(?:/[\w.-]+)*(?:\.\w+|/))(?![\w/-])")


def layout_block() -> str:
    section = TEXT.split("\n## Layout\n", 1)[1]
    return FENCE.search(section).group(2)


def layout_entries() -> dict[str, str]:
    """Each line of the layout block that starts in the first column: its path -> its
    description (continuation lines, indented, joined on)."""
    entries: dict[str, str] = {}
    path = None
    for line in layout_block().splitlines():
        if line[:1].strip():
            path, _, description = line.partition(" ")
            entries[path] = description
        elif path is not None:
            entries[path] += " " + line.strip()
    return entries


def names_in(description: str) -> list[str]:
    """File and directory names a description gives: words with a suffix (``cli.py``,
    ``RESULTS.md``) or ending in ``/`` (``templates/``)."""
    return [n for n in NAME.findall(description) if n.endswith("/") or Path(n).suffix in SUFFIXES]


def listed_files(directory: Path) -> set[str]:
    return {
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.suffix in LISTED_KINDS and p.name != "__init__.py"
    }


def test_layout_block_matches_the_tree():
    """The README's layout block names only what exists, and lists some directories in full.

    A line starting in the first column names a path from the repository root (a directory
    ends in ``/``); its description (the rest of the line and the indented lines below it)
    names entries of that directory by bare name (``cli.py``, ``templates/``) and other places
    by a path with a slash (``src/cli.py``). Every name must exist. The rule for listing in
    full: a directory whose description names any of its files must name every ``.py``,
    ``.yaml``, ``.json``, ``.sh`` and ``.sbatch`` file directly in it (``__init__.py`` aside),
    and each of its subdirectories, on a line of its own or in its description. A class name
    standing alone in the parentheses after a ``src/`` module (``generation.py
    (SampleGeneration)``) must be defined by that module.
    """
    entries = layout_entries()
    problems = []
    for path, description in entries.items():
        place = ROOT / path
        if not place.exists():
            problems.append(f"{path}: no such file or directory")
            continue
        names = names_in(description)
        base = place if path.endswith("/") else ROOT
        for name in names:
            target = (ROOT if "/" in name.rstrip("/") else base) / name
            if not target.exists():
                problems.append(f"{path}: names {name}, which does not exist")
        if not path.endswith("/"):
            continue
        bare = {n.rstrip("/") for n in names if "/" not in n.rstrip("/")}
        if not bare & listed_files(place):
            continue  # described, not listed
        for missing in sorted(listed_files(place) - bare):
            problems.append(f"{path}: lists its files but not {missing}")
        for sub in sorted(p for p in place.iterdir() if p.is_dir() and _holds_files(p)):
            if sub.name not in bare and f"{path}{sub.name}/" not in entries:
                problems.append(f"{path}: lists its entries but not {sub.name}/")
        if path.startswith("src/"):
            problems += _undefined_names(path, description)
    assert not problems, "README layout block:\n  " + "\n  ".join(problems)


def _holds_files(directory: Path) -> bool:
    return any(p.is_file() for p in directory.rglob("*") if "__pycache__" not in p.parts)


def _undefined_names(directory: str, description: str) -> list[str]:
    """Capitalised identifiers that stand alone in the parentheses after a module
    (``checkpoint.py (RunCheckpoint, BestCheckpoint)``, ``base.py (CausalLMModule: ...)``)."""
    problems = []
    for module_file, inside in re.findall(r"(\w+)\.py \(([^)]*)\)", description):
        items = (item.split(":")[0].strip() for item in inside.split(","))
        names = [n for n in items if re.fullmatch(r"[A-Z]\w*[a-z]\w*", n)]
        if not names:
            continue
        module_name = f"{directory.rstrip('/').replace('/', '.')}.{module_file}"
        module = importlib.import_module(module_name)
        problems += [f"{module_name} defines no {n}" for n in names if not hasattr(module, n)]
    return problems


# -------------------------------------------------------------------------------- commands
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# what a fragment `... --more` continues when it names no objective config of its own
FRAGMENT_BASE = ["fit", "--config", "configs/sft.yaml"]
# the shell variables of the README's loops, at one cell of the grid
VARIABLES = {"$loss": "ipo", "$beta": "0.5"}
LAUNCHERS = ("scripts/launch/torchrun.sh", "scripts/launch/slurm.sbatch")
COMMAND = re.compile(r"(?:[A-Z_]+=\S*\s+)*(?:python train\.py|make train|sbatch|scripts/launch/)")


@dataclass(frozen=True)
class Command:
    text: str  # as the README writes it
    argv: tuple[str, ...]  # what train.py receives: subcommand first


def code_spans() -> list[str]:
    """Every fenced block's lines (continuations joined) and every inline code span."""
    spans = []
    for body in fenced_blocks():
        spans += body.replace("\\\n", " ").splitlines()
    prose = FENCE.sub("", TEXT)
    for line in prose.splitlines():  # a table cell escapes its pipes
        if line.startswith("|"):
            prose = prose.replace(line, line.replace("\\|", "|"))
    spans += [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    return spans


def train_argv(span: str) -> tuple[str, ...] | None:
    """What ``train.py`` is given by a README command, or None if ``span`` is none."""
    span = span.split("#")[0].strip() if span.lstrip().startswith("make") else span.strip()
    if span.startswith("... --"):
        words = shlex.split(span[4:])
        # its own objective config (configs/dpo.yaml), or options for the SFT one
        own = words[:1] == ["--config"] and Path(words[1]).parent.name == "configs"
        return ("fit", *words) if own else (*FRAGMENT_BASE, *words)
    if not COMMAND.match(span):
        return None
    words = shlex.split(span)
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment variables
        words = words[1:]
    if words[:2] == ["python", "train.py"]:
        return tuple(words[2:])
    if words[:2] == ["make", "train"]:
        settings = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        config = settings.get("CONFIG", "configs/sft.yaml")
        return ("fit", "--config", config, *shlex.split(settings.get("ARGS", "")))
    if words[:1] == ["sbatch"]:  # sbatch's own options come before the script
        words = words[next((i for i, w in enumerate(words) if w in LAUNCHERS), len(words)) :]
    if words[:1] and words[0] in LAUNCHERS:
        return ("fit", *words[1:])
    return None


def readme_commands() -> list[Command]:
    commands: dict[tuple[str, ...], Command] = {}
    for span in code_spans():
        argv = train_argv(span)
        if argv is None:
            continue
        for name, value in VARIABLES.items():
            argv = tuple(w.replace(name, value) for w in argv)
        argv = tuple(w for w in argv if w != "...")
        if len(argv) < 2:
            continue  # a launcher named in prose, not a command
        commands.setdefault(argv, Command(span, argv))
    return list(commands.values())


# Commands that are parsed (in full, subcommand included) but not instantiated here, and why:
# the first key found in a command's words decides.
NOT_INSTANTIATED = {
    "configs/trainer/gpu.yaml": "a GPU preset: needs a CUDA GPU",
    "configs/trainer/ddp.yaml": "a GPU preset: needs CUDA GPUs",
    "configs/trainer/fsdp.yaml": "a GPU preset: needs CUDA GPUs",
    "configs/trainer/fsdp2.yaml": "a GPU preset: needs CUDA GPUs",
    "configs/trainer/deepspeed_zero3.yaml": "needs CUDA GPUs and deepspeed",
    "Qwen/Qwen2.5-0.5B-Instruct": "a hub model: needs the hub (tests run offline)",
    "runs/pretrain/version_0/hf": "needs the pretraining stage's export",
    "runs/sft/version_0/hf": "needs the SFT stage's export",
    # a second logger writes beside the run: each preset runs offline in tests/test_loggers.py
    **{
        f"configs/logger/{name}.yaml": "a second logger (run in tests/test_loggers.py)"
        for name in ("wandb", "mlflow", "swanlab", "csv")
    },
}
# Commands that cannot even be parsed without a run of their own, and why.
NOT_PARSED = {
    "runs/dpo_grid/ipo-beta0.5/config.yaml": "needs the config a grid cell's run wrote",
}


def _reason(command: Command, reasons: dict[str, str]) -> str | None:
    return next((why for key, why in reasons.items() if key in command.argv), None)


def _in_tmp(argv: tuple[str, ...], tmp: Path) -> list[str]:
    """``argv`` with the run directories it names (``runs/...``) under ``tmp``, so no run of
    this checkout's own ``runs/`` is read, and its runs written there."""
    return [str(tmp / w) if w.startswith("runs/") else w for w in argv]


def _without_subcommand(argv: list[str]) -> list[str]:
    """What ``cli_main(run=False)`` takes: no subcommand and no ``--ckpt_path`` (an argument of
    the subcommands)."""
    words = argv[1:] if argv[0] in SUBCOMMANDS else list(argv)
    kept: list[str] = []
    skip = False
    for word in words:
        if skip or word.startswith("--ckpt_path="):
            skip = False
            continue
        skip = word == "--ckpt_path"
        if not skip:
            kept.append(word)
    return kept


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def full_parser():
    """The parser ``train.py`` uses, with its subcommands (``cli_main`` parses without)."""
    from src.cli import cli_main

    cli = cli_main(["--config", str(ROOT / "configs" / "sft.yaml")], run=False)
    cli.setup_parser(True, *cli._setup_parser_kwargs(cli.parser_kwargs))
    return cli.parser


@pytest.fixture
def readme_objectives(tmp_path, monkeypatch):
    """The README's ``my_objectives.py``, importable as it would be next to ``train.py``."""
    source = next(b for b in fenced_blocks("python") if b.startswith("# my_objectives.py"))
    (tmp_path / "my_objectives.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_readme_commands_are_found():
    texts = " ".join(" ".join(c.argv) for c in COMMANDS)
    for shown in ("fit --config configs/sft.yaml", "predict --config", "test --config", "lr_find"):
        assert shown in texts
    for reasons in (NOT_INSTANTIATED, NOT_PARSED):
        for key in reasons:  # an exception no command needs any more is taken out
            assert any(key in c.argv for c in COMMANDS), f"no README command names {key}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c.argv)[:90])
def test_readme_command_parses(
    command, full_parser, readme_objectives, tmp_path, monkeypatch, capsys
):
    """Each command parses as ``train.py`` parses it and, where this machine can build what it
    names, ``cli_main(args, run=False)`` instantiates its trainer, model and data."""
    from src.cli import cli_main

    monkeypatch.chdir(ROOT)  # the commands name configs/ and data/ from the repository root
    if why := _reason(command, NOT_PARSED):
        pytest.skip(why)
    argv = _in_tmp(command.argv, tmp_path)
    if argv[0] in TUNE_COMMANDS:  # its own options, then the fit's arguments
        _, fit_args = tune_parser(argv[0]).parse_known_args(argv[1:])
        argv = ["fit", *fit_args]
    if "--print_config" in argv:
        with pytest.raises(SystemExit) as printed:
            full_parser.parse_args(argv)
        assert printed.value.code == 0 and "model:" in capsys.readouterr().out
        return
    try:
        full_parser.parse_args(argv)
    except Exception as err:
        pytest.fail(f"README command `{command.text}` does not parse: {err}")
    if why := _reason(command, NOT_INSTANTIATED):
        pytest.skip(f"parsed, not instantiated: {why}")
    args = [*_without_subcommand(argv), "--trainer.logger.save_dir", str(tmp_path / "runs")]
    cli = cli_main(args, run=False)
    assert cli.trainer is not None and cli.model is not None and cli.datamodule is not None


# ------------------------------------------------------------------------------ short form
SHORT_AND_LONG = [
    ("--model.beta", "--model.init_args.beta", "0.5"),
    ("--model.loss_type", "--model.init_args.loss_type", "ipo"),
    ("--data.max_length", "--data.init_args.max_length", "128"),
    ("--model.lora.use_dora", "--model.init_args.lora.use_dora", "true"),
    ("--trainer.logger.name", "--trainer.logger.init_args.name", "grid"),
]


def test_short_options_mean_the_long_ones(full_parser, monkeypatch):
    """``--model.beta`` is ``--model.init_args.beta`` (jsonargparse fills in ``init_args``),
    as the README writes its commands; a nested class takes it too."""
    from src.cli import cli_main

    monkeypatch.chdir(ROOT)
    base = ["fit", "--config", "configs/dpo.yaml"]
    short = [w for s, _, v in SHORT_AND_LONG for w in (s, v)]
    long = [w for _, key, v in SHORT_AND_LONG for w in (key, v)]
    assert full_parser.parse_args(base + short) == full_parser.parse_args(base + long)
    optimizer = ["--model.optimizer", "torch.optim.Adafactor"]
    assert full_parser.parse_args([*base, *optimizer, "--model.optimizer.lr", "0.01"]) == (
        full_parser.parse_args([*base, *optimizer, "--model.optimizer.init_args.lr", "0.01"])
    )
    cli = cli_main([*base[1:], *short], run=False)
    assert (cli.model.beta, cli.model.loss_type, cli.model.lora.use_dora) == (0.5, "ipo", True)
    assert cli.datamodule.max_length == cli.model.max_length == 128  # linked from data


def test_readme_commands_use_the_short_form():
    long = sorted(
        {
            w.split("=")[0]
            for c in COMMANDS
            for w in c.argv
            if w.startswith("--") and "init_args" in w
        }
    )
    assert not long, f"README commands spell out init_args: {long} (write --model.beta)"


# ----------------------------------------------------------------------------- real runs
# The README's commands run for real, each cut to a few steps and batches, its runs, its data
# cache and its outputs under tmp_path. SFT first: the evaluation and prediction commands read
# its checkpoint.
SFT = "fit --config configs/sft.yaml"
RUNS = [
    "fit --config configs/pretrain.yaml",
    "fit --config configs/dpo.yaml --model.loss_type ipo",
    "fit --config configs/sft.yaml --trainer configs/trainer/debug.yaml",
]
FROM_SFT = [
    "test --config configs/sft.yaml --ckpt_path runs/sft/version_0/checkpoints/last.ckpt",
    "predict --config configs/sft.yaml --ckpt_path runs/sft/version_0/checkpoints/last.ckpt "
    "--data.predict_files data/demo/sft_val.jsonl",
]


def _limits(tmp: Path) -> list[str]:
    return [
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--trainer.limit_predict_batches=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.save_dir={tmp / 'runs'}",
        f"--data.cache_dir={tmp / 'cache'}",
    ]


def _run(text: str, tmp: Path):
    from src.cli import cli_main

    command = next((c for c in COMMANDS if " ".join(c.argv) == text), None)
    assert command is not None, f"the README no longer has `python train.py {text}`"
    cli = cli_main([*_in_tmp(command.argv, tmp), *_limits(tmp)])
    assert cli.trainer.state.finished, text
    return cli


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme_sft")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        cli = _run(SFT, tmp)
    return tmp, cli


@pytest.mark.slow
def test_readme_sft_command_trains_and_exports(sft_run):
    tmp, cli = sft_run
    run = tmp / "runs" / "sft" / "version_0"
    assert cli.trainer.global_step == 2
    for written in ("config.yaml", "run.json", "checkpoints/last.ckpt", "hf/config.json"):
        assert (run / written).is_file(), written


@pytest.mark.slow
@pytest.mark.parametrize("text", RUNS)
def test_readme_command_runs(text, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert _run(text, tmp_path).trainer.global_step == 2


@pytest.mark.slow
@pytest.mark.parametrize("text", FROM_SFT)
@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # a new run reads an older one's
def test_readme_command_runs_on_the_sft_checkpoint(text, sft_run, monkeypatch):
    tmp, _ = sft_run
    monkeypatch.chdir(ROOT)
    _run(text, tmp)
    if text.startswith("predict"):
        (predictions,) = (tmp / "runs" / "sft").glob("version_*/predictions.jsonl")
        assert predictions.read_text(encoding="utf-8").count("\n") > 0


def test_readme_custom_objective_computes_the_focal_loss(readme_objectives, micro_model_dir):
    """The README's ``FocalSFT`` from the lean head equals the focal loss by hand from the
    full logits, and with ``gamma`` 0 the SFT loss."""
    import torch
    from my_objectives import FocalSFT

    torch.manual_seed(0)
    module = FocalSFT(
        model_name_or_path=str(micro_model_dir), from_scratch=True, tokenizer=str(ASSETS)
    )
    module.configure_model()
    ids = torch.randint(3, 200, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    terms = module.loss_terms(batch)
    with torch.no_grad():
        logits = module(batch)[:, :-1]
    mask = labels[:, 1:] != -100
    logp = torch.log_softmax(logits[mask], -1).gather(1, labels[:, 1:][mask][:, None])[:, 0]
    expected = (-((1 - logp.exp()) ** 2) * logp).sum()
    assert terms.count.item() == mask.sum().item() == 16
    torch.testing.assert_close(terms.loss_sum.detach(), expected, rtol=1e-5, atol=0)
    module.gamma = 0.0
    torch.testing.assert_close(
        module.loss_terms(batch).loss_sum.detach(), -logp.sum(), rtol=1e-5, atol=0
    )
