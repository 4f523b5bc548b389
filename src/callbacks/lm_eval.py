"""Benchmarks of lm-evaluation-harness on the model in training, as ``eval/<task>/<metric>``."""

from __future__ import annotations

import copy
import json
import logging
import numbers
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from src.callbacks.preemption import Preemption
from src.callbacks.run_dir import run_dir
from src.errors import ConfigError, did_you_mean, one_line
from src.loggers import log_file
from src.strategies import call_outside_step, missing_requirements, parameters_are_sharded

PREFIX = "eval/"
_UNSAFE = re.compile(r"[^\w\-.]")  # TensorBoard, W&B and MLflow all take these characters
_RUN = "_lm_eval_run"  # the evaluation, set on the module while it runs (FSDP1, see below)


def metric_name(key: str) -> str:
    """Our name for one of lm-eval's result keys, ``<metric>,<filter>``: ``acc,none`` is
    ``acc``, ``exact_match,strict-match`` is ``exact_match/strict-match``."""
    metric, _, filter_name = key.partition(",")
    parts = [metric] if filter_name in ("", "none") else [metric, filter_name]
    return "/".join(_UNSAFE.sub("_", p) for p in parts)


def scores(results: dict[str, Any], metrics: list[str] | None = None) -> dict[str, float]:
    """The numbers of an lm-eval result to log, as ``eval/<task>/<metric>``.

    Every task or group that is not part of a group: a group by its aggregate (its tasks
    are in ``eval.json``), or, when it has none, by its tasks in turn; a tag is the tasks it
    names. ``metrics`` (our names, e.g. ``acc``) keeps only those; by default every metric
    but the standard errors.
    """
    entries: dict[str, dict[str, Any]] = results.get("results", {})
    groups: dict[str, list[str]] = results.get("group_subtasks", {})
    members = {name for children in groups.values() for name in children}
    out: dict[str, float] = {}

    def add(task: str) -> None:
        values = {
            metric_name(key): float(value)
            for key, value in entries.get(task, {}).items()
            if "," in key and isinstance(value, numbers.Real) and not isinstance(value, bool)
        }
        kept = {
            name: value
            for name, value in values.items()
            if (name in metrics if metrics else "_stderr" not in name)
        }
        if not kept and groups.get(task):
            for child in groups[task]:
                add(child)
        for name, value in kept.items():
            out[f"{PREFIX}{_UNSAFE.sub('_', task)}/{name}"] = value

    for task in entries:
        if task not in members:
            add(task)
    return out


class LMEval(pl.Callback):
    """lm-evaluation-harness tasks on the model in memory, at validations and at fit end.

    Each numeric metric is logged as ``eval/<task>/<metric>`` beside ``val/loss``: the task's
    name, and lm-eval's key ``<metric>,<filter>`` with the filter dropped when it is ``none``
    (``acc,none`` is ``eval/arith/acc``, gsm8k's ``exact_match,strict-match`` is
    ``eval/gsm8k/exact_match/strict-match``); characters other than letters, digits, ``_-.``
    become ``_``. A group is logged by its aggregate, a tag by its tasks. The values are logged
    from the validation, so ``--best.monitor eval/<task>/<metric> --best.mode max`` ranks
    checkpoints by them, and TensorBoard's HPARAMS tab shows them as columns. Every result
    (subtasks, standard errors, document counts) is appended to ``<run>/eval.json``.

    The model is evaluated as it is, adapters and sharding included, in eval mode without
    gradients, under the trainer's precision, with the training RNG streams (Python, NumPy,
    torch) left as they were; its train/eval modes are restored after. Where every process
    holds the whole model (one device, DDP, ZeRO-1/2), the documents are split over the
    processes and the results gathered on rank 0 (lm-eval's data parallelism). Where the
    weights are sharded (FSDP, ZeRO-3), each forward is a collective: every process runs
    every request, in the same order and batches (generation with ``synced_gpus``). Either
    way every process logs rank 0's numbers.

    Args:
        tasks: lm-eval task, group or tag names (``mmlu``, ``gsm8k``, or a local task's).
        include_path: A folder of task YAMLs (lm-eval's ``include_path``), searched before
            lm-eval's own tasks; relative dataset paths in them are read from the working
            directory.
        every_n_validations: Evaluate at the first validation (with ``ValidateOnStart``, the
            untrained step-0 baseline) and every n-th after it.
        at_fit_end: Evaluate the final weights once more when fit ends, unless the last
            validation has just done so; logged at the step of the last ``train/loss``.
        limit: Documents per task: a count, or a fraction below 1 (None: all of them).
        num_fewshot: Few-shot examples per prompt (None: each task's own, else 0); few-shot
            examples are drawn with ``seed``, the same at every evaluation.
        batch_size: Requests per forward pass.
        max_length: Longest input in tokens, contexts cut on the left (None: lm-eval's rule,
            the model's position limit).
        apply_chat_template: Render prompts with the tokenizer's chat template (few-shot
            examples as turns), as an instruction-tuned model is prompted.
        system_instruction: A system prompt for every request.
        gen_kwargs: Generation settings for every generative task, over its own (e.g.
            ``{max_gen_toks: 64}`` caps the cost of an evaluation in the loop).
        metrics: Our metric names to log (``acc``, ``exact_match/strict-match``); None:
            all but the standard errors. Every one goes to ``eval.json``.
        bootstrap_iters: lm-eval's bootstrap iterations for standard errors; 0: none (lm-eval
            bootstraps some metrics in a pool of processes, which a training process should
            not fork).
        seed: Seed of the few-shot draws and of any sampling in generation.
    """

    def __init__(
        self,
        tasks: list[str],
        include_path: str | None = None,
        every_n_validations: int = 1,
        at_fit_end: bool = True,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        apply_chat_template: bool = False,
        system_instruction: str | None = None,
        gen_kwargs: dict[str, Any] | None = None,
        metrics: list[str] | None = None,
        bootstrap_iters: int = 0,
        seed: int = 0,
    ) -> None:
        problem = missing_requirements(
            "the LMEval callback (src.callbacks.LMEval)", packages=("lm_eval",)
        )
        if problem:
            raise ConfigError(problem)
        if not tasks:
            raise ConfigError("LMEval: tasks is empty; name at least one lm-eval task")
        if every_n_validations < 1 or batch_size < 1:
            raise ConfigError("LMEval: every_n_validations and batch_size must be at least 1")
        if limit is not None and limit <= 0:
            raise ConfigError(f"LMEval: limit must be positive or null, got {limit}")
        if include_path is not None and not Path(include_path).is_dir():
            raise ConfigError(f"LMEval: include_path {include_path} is not a folder")
        self.tasks = list(tasks)
        self.include_path = include_path
        self.every_n_validations = every_n_validations
        self.at_fit_end = at_fit_end
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.max_length = max_length
        self.apply_chat_template = apply_chat_template
        self.system_instruction = system_instruction
        self.gen_kwargs = gen_kwargs
        self.metrics = metrics
        self.bootstrap_iters = bootstrap_iters
        self.seed = seed
        self._task_dict: dict[str, Any] | None = None
        self._tokenizer: tuple[Any, Any] | None = None  # (the module's, our copy)
        self._validations = 0
        self._evaluated_step: int | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_monitors(trainer)
        if self._task_dict is None:  # every process: an unknown task fails before training
            self._task_dict = self._load_tasks()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        for name, value in self.evaluate(trainer, pl_module).items():
            pl_module.log(name, value, sync_dist=False, on_step=False, on_epoch=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_fit_end or self._evaluated_step == trainer.global_step:
            return
        if any(isinstance(c, Preemption) and c.signal_received for c in trainer.callbacks):
            return  # a preempted job's time is short: the checkpoint comes first
        values = self.evaluate(trainer, pl_module, when="fit_end")
        if trainer.is_global_zero:
            # the step the last train/loss went to, as Lightning logs a validation's values
            step = max(trainer.global_step - 1, 0)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations, "evaluated_step": self._evaluated_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = state_dict.get("validations", 0)
        self._evaluated_step = state_dict.get("evaluated_step")

    # ------------------------------------------------------------- evaluation
    def evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str = "validation"
    ) -> dict[str, float]:
        """Run the tasks on ``pl_module.model`` (every process must call it): the values to
        log, the same on every process; rank 0 appends the whole result to ``eval.json``."""
        from lm_eval.evaluator import evaluate

        if self._task_dict is None:
            self._task_dict = self._load_tasks()
        strategy = trainer.strategy
        sharded = parameters_are_sharded(strategy) and trainer.world_size > 1
        split = not sharded and trainer.world_size > 1
        lm = self._lm(trainer, pl_module, sharded, split)
        for task in self._task_dict["tasks"].values():
            task.set_fewshot_seed(seed=self.seed)  # the same few-shot prompts every time

        def run() -> dict[str, Any] | None:
            return evaluate(
                lm,
                self._task_dict,
                limit=self.limit,
                bootstrap_iters=self.bootstrap_iters,
                log_samples=False,
                system_instruction=self.system_instruction,
                apply_chat_template=self.apply_chat_template,
                fewshot_as_multiturn=self.apply_chat_template,
            )

        start = time.perf_counter()
        model = pl_module.model
        with (
            _training_rng_kept(self.seed, pl_module.device),
            _eval_mode(model),
            torch.no_grad(),
            trainer.precision_plugin.forward_context(),
        ):
            results = _through_strategy(pl_module, run)
        seconds = time.perf_counter() - start
        values = scores(results, self.metrics) if trainer.is_global_zero and results else None
        if trainer.world_size > 1:
            values = strategy.broadcast(values, src=0)
        values = values or {}
        self._evaluated_step = trainer.global_step
        if trainer.is_global_zero and results:
            self._report(trainer, results, values, when, seconds)
        return values

    def _lm(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, sharded: bool, split: bool
    ) -> Any:
        tokenizer = pl_module.tokenizer
        if self._tokenizer is None or self._tokenizer[0] is not tokenizer:
            # lm-eval pads with the tokenizer (and may set a pad token): a copy of its own
            self._tokenizer = (tokenizer, copy.deepcopy(tokenizer))
        lm_class = _in_memory_lm_class()
        with _quiet("lm_eval"):  # its warnings about a model passed as an object are ours
            return lm_class(
                _ModelCalls(pl_module.model, pl_module.device, synced=sharded),
                tokenizer=self._tokenizer[1],
                trainer=trainer,
                split=split,
                batch_size=self.batch_size,
                max_length=self.max_length,
            )

    def _load_tasks(self) -> dict[str, Any]:
        from lm_eval.tasks import TaskManager

        manager = local = None
        if self.include_path:
            # lm-eval's own index takes seconds to build: skipped when the folder has them all
            local = TaskManager(include_path=self.include_path, include_defaults=False)
            if all(t in local.all_tasks for t in self.tasks):
                manager = local
        manager = manager or TaskManager(include_path=self.include_path)
        unknown = [t for t in self.tasks if t not in manager.all_tasks]
        if unknown:
            found = (
                f"the tasks in {self.include_path}: {', '.join(local.all_tasks) or 'none'}"
                if local is not None
                else "no include_path is set (a folder of task YAMLs)"
            )
            raise ConfigError(
                f"LMEval: unknown lm-eval task {unknown[0]!r}"
                f"{did_you_mean(unknown[0], manager.all_tasks)}; {found}; "
                "`lm-eval ls tasks` lists lm-eval's own"
            )
        try:
            with _quiet("lm_eval"):
                loaded = manager.load(self.tasks)
        except Exception as err:  # the dataset: not found, or not reachable offline
            raise ConfigError(f"LMEval: lm-eval cannot load {self.tasks}: {one_line(err)}") from err
        for task in loaded["tasks"].values():
            # as lm-eval's simple_evaluate: num_fewshot overrides all but a task's explicit 0
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            if self.gen_kwargs and task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=dict(self.gen_kwargs), update=True)
        return loaded

    def _check_monitors(self, trainer: pl.Trainer) -> None:
        """A checkpoint ranked (or a fit stopped) by a value logged only every few
        validations would judge the weights between by an older score."""
        if self.every_n_validations == 1:
            return
        for callback in trainer.callbacks:
            monitor = getattr(callback, "monitor", None) or ""
            active = (isinstance(callback, ModelCheckpoint) and callback.save_top_k != 0) or (
                isinstance(callback, EarlyStopping) and callback.patience is not None
            )
            if active and monitor.startswith(PREFIX):
                raise ConfigError(
                    f"{type(callback).__name__} monitors {monitor}, which LMEval logs every "
                    f"{self.every_n_validations} validations: the validations between would be "
                    "judged by an older score; set every_n_validations: 1 (and a longer "
                    "trainer.val_check_interval)"
                )

    def _report(
        self,
        trainer: pl.Trainer,
        results: dict[str, Any],
        values: dict[str, float],
        when: str,
        seconds: float,
    ) -> None:
        counts = {t: n.get("effective") for t, n in results.get("n-samples", {}).items()}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items()) or "no metric"
        rank_zero_info(
            f"[lm-eval] step {trainer.global_step}: {shown} "
            f"({sum(c or 0 for c in counts.values())} documents, {seconds:.1f}s)"
        )
        if self.metrics and not values:
            rank_zero_warn(f"LMEval: none of the metrics {self.metrics} is in lm-eval's results")
        directory = run_dir(trainer)
        if directory is None:
            return
        path = Path(directory) / "eval.json"
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        record.setdefault("tasks", self.tasks)
        record.setdefault("evaluations", []).append(
            {
                "step": trainer.global_step,
                "when": when,
                "seconds": round(seconds, 3),
                "logged": values,
                **{
                    key: results.get(key, {})
                    for key in (
                        "results",
                        "group_subtasks",
                        "n-shot",
                        "n-samples",
                        "versions",
                        "higher_is_better",
                    )
                },
            }
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(record, indent=1, default=_plain) + "\n", encoding="utf-8")
        partial.replace(path)
        log_file(trainer, path)


# -------------------------------------------------------------------- model side
class _ModelCalls:
    """What lm-eval's ``HFLM`` calls on its model, routed to the model in training.

    Not a ``torch.nn.Module``, so ``HFLM`` neither switches its mode nor re-ties its weights
    (which would replace parameters under FSDP).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, synced: bool) -> None:
        self.model = model
        self.config = model.config
        self.device = device
        self.synced = synced

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, use_cache=False, **kwargs)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        # sharded weights: every process steps until all are done, each step a collective
        return self.model.generate(**kwargs, synced_gpus=self.synced)


@cache
def _in_memory_lm_class() -> type:
    """``HFLM`` for a model in memory: ranks from the trainer, quiet progress bars, no hub."""
    from lm_eval.models.huggingface import HFLM

    class InMemoryLM(HFLM):
        def __init__(
            self, model: _ModelCalls, trainer: pl.Trainer, split: bool, **kwargs: Any
        ) -> None:
            super().__init__(pretrained=model, backend="causal", **kwargs)
            self.trainer = trainer
            # split: lm-eval gives each process every world_size-th document and gathers
            # the per-document metrics on rank 0; otherwise each process runs them all
            self._split = split

        @property
        def rank(self) -> int:
            return self.trainer.global_rank if self._split else 0

        @property
        def world_size(self) -> int:
            return self.trainer.world_size if self._split else 1

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if not self._split:
                return tensor
            return self.trainer.strategy.all_gather(tensor).reshape(-1)

        def barrier(self) -> None:
            if self._split:
                self.trainer.strategy.barrier()

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().generate_until(requests, disable_tqdm=True)

    return InMemoryLM


def _through_strategy(pl_module: pl.LightningModule, run: Callable[[], Any]) -> Any:
    """``run()`` where the strategy runs the module's model calls: under FSDP1 inside the
    wrapper's forward, which gathers the weights of the root unit (embeddings, final norm),
    as for a step; elsewhere a plain call."""
    pl_module.__dict__[_RUN] = run
    try:
        return call_outside_step(pl_module, _RUN)
    finally:
        pl_module.__dict__.pop(_RUN, None)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def _training_rng_kept(seed: int, device: torch.device) -> Iterator[None]:
    """Seeded streams for the evaluation; the training's own (Python, NumPy, torch on the CPU
    and this GPU) as they were after it."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _plain(value: Any) -> Any:
    """JSON for what lm-eval's results may hold besides plain values (NumPy scalars)."""
    return value.item() if isinstance(value, np.generic) else str(value)
