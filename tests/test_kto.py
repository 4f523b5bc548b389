"""KTO: the loss by hand and against TRL, the unpaired data (formats, labels, KL partners), the
module's reference (step 0, precomputed, LoRA), and a short fit of configs/kto.yaml.

TRL (a dev dependency, 1.16 here) computes its KTO loss inline in ``KTOTrainer._compute_loss``;
it runs here on a stub ``self`` with precomputed reference log-probs and a fake model whose
per-token log-probabilities sum to the given ones (``trl_kto``).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import types
from collections import defaultdict

import pytest
import torch

from src.datamodules import DataError, UnpairedPreferenceDataModule
from src.datamodules.formats import to_unpaired
from src.datamodules.records import Record
from src.datamodules.unpaired import mismatched_partners
from src.modules import KTOModule, LoraSettings, losses
from tests.conftest import ASSETS, ROOT, write_jsonl
from tests.test_e2e import scalars
from tests.test_preference_losses import sgd_step

BETA = 0.5


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ====================================================================== by hand


def test_kto_loss_by_hand():
    logps, ref = t(-10, -12, -8, -15), t(-11, -11, -9, -14)  # log-ratios 1, -1, 1, -1
    desirable = torch.tensor([True, False, False, True])
    kl, w_d, w_u = 0.3, 1.5, 0.7
    chosen = logps.clone().requires_grad_()
    loss, rewards = losses.kto_loss(chosen, ref, desirable, kl, BETA, w_d, w_u)
    expected = [
        w_d * (1 - sigmoid(BETA * (1 - kl))),  # desirable: 1 - sigma(beta (r - z))
        w_u * (1 - sigmoid(BETA * (kl + 1))),  # undesirable: 1 - sigma(beta (z - r))
        w_u * (1 - sigmoid(BETA * (kl - 1))),
        w_d * (1 - sigmoid(BETA * (-1 - kl))),
    ]
    assert loss.tolist() == pytest.approx(expected, abs=1e-12)
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5], abs=1e-12)
    assert not rewards.requires_grad
    loss.sum().backward()  # desirable rows gain by a higher log-prob, undesirable ones lose
    assert chosen.grad[desirable].lt(0).all() and chosen.grad[~desirable].gt(0).all()
    apo, apo_rewards = losses.apo_zero_unpaired_loss(logps, ref, desirable, BETA, w_d, w_u)
    assert apo.tolist() == pytest.approx(
        [w_d * (1 - sigmoid(0.5)), w_u * sigmoid(-0.5), w_u * sigmoid(0.5), w_d * sigmoid(0.5)],
        abs=1e-12,
    )
    assert torch.equal(apo_rewards, rewards)


# ===================================================================== vs TRL


def trl_kto(
    loss_type: str,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    label: torch.Tensor,
    weights: tuple[float, float],
) -> tuple[float, dict[str, float]]:
    """TRL 1.16's ``KTOTrainer._compute_loss`` on given summed log-probabilities: the mean
    loss over the rows and TRL's logged metrics."""
    from trl import KTOTrainer

    rows, width = len(logps), 6
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    completion_mask[:, 2:5] = 1  # three completion tokens a row
    per_token = torch.zeros(rows, width - 1, dtype=logps.dtype)
    per_token[:, 1:4] = logps[:, None] / 3  # shifted: position t predicts token t + 1
    outputs = types.SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
    )
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(
            device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
        calculate_KL=loss_type == "kto",  # as TRL sets it
        precompute_ref_logps=True,
        _compute_kl_logps=lambda model, batch: kl_logps if loss_type == "kto" else None,
        loss_type=loss_type,
        beta=BETA,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "label": label,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    loss = KTOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, False)
    return float(loss), {k: v[-1] for k, v in stub._metrics["train"].items()}


def random_rows(n: int, kl_shift: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Summed log-probs of ``n`` rows and of their KL sequences, policy and reference, and
    labels; the KL log-ratios average about ``kl_shift``."""
    g = torch.Generator().manual_seed(seed)
    logps = -40 * torch.rand(n, generator=g, dtype=torch.float64) - 1
    ref = logps + 3 * torch.randn(n, generator=g, dtype=torch.float64)
    kl_logps = -40 * torch.rand(n, generator=g, dtype=torch.float64) - 1
    ref_kl = kl_logps - kl_shift + torch.randn(n, generator=g, dtype=torch.float64)
    label = torch.tensor([True, False, False] * (n // 3) + [True] * (n % 3))
    return logps, ref, kl_logps, ref_kl, label


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.6)], ids=["equal", "unequal"])
@pytest.mark.parametrize("kl_shift", [2.0, -2.0], ids=["kl", "kl_clamped"])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(loss_type, kl_shift, weights):
    pytest.importorskip("trl")
    logps, ref, kl_logps, ref_kl, label = random_rows(11, kl_shift)
    expected, metrics = trl_kto(loss_type, logps, ref, kl_logps, ref_kl, label, weights)
    module = types.SimpleNamespace(_trainer=None)  # one process: no reduce
    kl = KTOModule.kl_estimate(module, kl_logps, ref_kl)
    assert (kl.item() > 0) == (kl_shift > 0)  # a negative estimate is clamped at 0
    if loss_type == "kto":
        loss, rewards = losses.kto_loss(logps, ref, label, kl, BETA, *weights)
        assert kl.item() == pytest.approx(metrics["kl"], abs=1e-6)
    else:
        loss, rewards = losses.apo_zero_unpaired_loss(logps, ref, label, BETA, *weights)
    assert loss.mean().item() == pytest.approx(expected, abs=1e-6)
    assert rewards[label].mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-6)
    assert rewards[~label].mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-6)
    assert logps[label].mean().item() == pytest.approx(metrics["logps/chosen"], abs=1e-6)


# ======================================================================== data

QUESTIONS = [("2 + 2?", "4", "5"), ("Capital of France?", "Paris.", "Rome, I think.")]
QUESTIONS += [("Say hi.", "Hi there, friend!", "No."), ("Sky colour?", "Blue.", "Green")]
ROWS = [  # each prompt twice, one after the other, as in the demo data
    {"prompt": q, "completion": answer, "label": label}
    for q, good, bad in QUESTIONS
    for answer, label in ((good, True), (bad, False))
]


def unpaired(train_files, **kwargs) -> UnpairedPreferenceDataModule:
    kwargs = {"val_split": 0, "cache_dir": None, "max_length": 64, **kwargs}
    dm = UnpairedPreferenceDataModule(tokenizer=str(ASSETS), train_files=train_files, **kwargs)
    dm.setup("fit")
    return dm


def rows_of(dm, split: str = "train") -> list[dict]:
    return [dm.datasets[split][i] for i in range(len(dm.datasets[split]))]


def completion_start(row: dict) -> int:
    return next(i for i, x in enumerate(row["labels"]) if x != -100)


def trained_text(dm, labels: list[int]) -> str:
    return dm.tokenizer.decode([x for x in labels if x != -100])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> UnpairedPreferenceDataModule:
    return unpaired(str(write_jsonl(tmp_path_factory.mktemp("kto") / "rows.jsonl", ROWS)))


@pytest.fixture(scope="module")
def batch(data) -> dict[str, torch.Tensor]:
    return data.collator()(rows_of(data))


def test_every_format_trains_exactly_the_completion_through_its_stop_token(tmp_path):
    user = {"role": "user", "content": "Name a fruit."}
    messages = write_jsonl(
        tmp_path / "messages.jsonl",
        [
            {"prompt": [user], "completion": [{"role": "assistant", "content": "A pear."}]}
            | {"label": True},
            {"messages": [user, {"role": "assistant", "content": "A car."}], "kto_tag": False},
        ],
    )
    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {"dialog": [{"from": "human", "value": "Name a fish."}, {"from": "gpt", "value": v}]}
            | {"good": good}
            for v, good in (("A trout.", True), ("A tree.", False))
        ],
    )
    source = {"path": str(sharegpt), "columns": {"conversations": "dialog", "kto_tag": "good"}}
    dm = unpaired([str(messages), source | {"loss_weight": 2.0}])
    rows = rows_of(dm)
    texts = ["A pear.", "A car.", "A trout.", "A tree."]
    assert [trained_text(dm, r["labels"]) for r in rows] == [f"{x}<|im_end|>" for x in texts]
    assert [r["label"] for r in rows] == [True, False, True, False]
    for row in rows:  # the prompt, through the generation prompt, is never trained
        prompt = dm.tokenizer.decode(row["input_ids"][: completion_start(row)])
        assert prompt.endswith("<|im_start|>assistant\n") and "Name a f" in prompt
    batch = dm.collator()(rows)
    width = batch["input_ids"].shape[1]
    assert batch["kl_input_ids"].shape == (4, width) and batch["label"].tolist() == [1, 0, 1, 0]
    assert batch["loss_weight"].tolist() == [1.0, 1.0, 2.0, 2.0]
    lengths = [len(r["input_ids"]) + len(r["kl_input_ids"]) for r in rows]
    assert (
        batch["real_tokens"].item()
        == sum(lengths)
        == batch["attention_mask"].sum() + batch["kl_attention_mask"].sum()
    )
    assert batch["token_slots"].item() == 2 * 4 * width


def test_rows_that_are_not_unpaired_preference_data_say_what_to_do():
    pair = {"prompt": "q", "chosen": "a", "rejected": "b", "messages": [{"role": "user"}]}
    with pytest.raises(DataError, match=r"x:1: .*boolean 'label' .*found no such field.*two rows"):
        to_unpaired(Record(pair, "x:1"))
    with pytest.raises(DataError, match=r"x:1: .*boolean 'label'.*found label: 1\. Name another"):
        to_unpaired(Record({"prompt": "q", "completion": "a", "label": 1}, "x:1"))
    unanswered = {"messages": [{"role": "user", "content": "q"}], "label": True}
    with pytest.raises(DataError, match=r"x:1: .*no assistant answer last"):
        to_unpaired(Record(unanswered, "x:1"))


def test_kl_sequences_are_the_prompt_with_another_prompts_completion(data):
    rows = rows_of(data)
    prompts, completions = [], []
    for row in rows:
        start = completion_start(row)
        prompts.append(row["input_ids"][:start])
        completions.append((row["input_ids"][start:], row["labels"][start:]))
    partners = []
    for i, row in enumerate(rows):
        n = len(prompts[i])
        assert row["kl_input_ids"][:n] == prompts[i] and set(row["kl_labels"][:n]) == {-100}
        tail = (row["kl_input_ids"][n:], row["kl_labels"][n:])
        matches = [j for j, completion in enumerate(completions) if completion == tail]
        assert len(matches) == 1
        partners.append(matches[0])
    assert sorted(partners) == list(range(len(rows)))  # every completion once
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partners))
    again = unpaired(data.train_sources)  # preparation fixes the pairing
    assert rows_of(again) == rows


def test_mismatched_partners_avoid_the_same_prompt_wherever_possible():
    keys = [k for k in "abcdefghij" for _ in range(2)]  # each prompt twice, consecutively
    partners = mismatched_partners(keys, seed=42)
    assert sorted(partners) == list(range(20))
    assert all(keys[j] != keys[i] for i, j in enumerate(partners))
    assert mismatched_partners(keys, seed=42) == partners
    assert mismatched_partners(keys, seed=7) != partners
    dominant = ["a"] * 7 + ["b", "c", "d"]  # 7 of 10: 2 * 7 - 10 = 4 rows cannot avoid "a"
    partners = mismatched_partners(dominant, seed=0)
    assert all(j != i for i, j in enumerate(partners)) and sorted(partners) == list(range(10))
    assert sum(dominant[j] == dominant[i] for i, j in enumerate(partners)) == 4
    assert sorted(mismatched_partners(["a"] * 3, seed=0)) == [0, 1, 2]  # only one prompt


def test_kl_completions_are_cut_to_max_length_and_one_row_is_refused(tmp_path):
    long_prompt = " ".join(["word"] * 40)
    rows = [
        {"prompt": long_prompt, "completion": "Yes.", "label": True},
        {"prompt": "Hi?", "completion": " ".join(["long"] * 40), "label": False},
    ]
    dm = unpaired(str(write_jsonl(tmp_path / "long.jsonl", rows)), max_length=48)
    first, second = rows_of(dm)
    assert len(first["input_ids"]) <= 48 and len(second["input_ids"]) <= 48
    assert len(first["kl_input_ids"]) == 48  # the long prompt + the cut long completion
    assert first["kl_labels"][-1] != -100
    with pytest.raises(DataError, match="a split of one unpaired row cannot pair"):
        unpaired(str(write_jsonl(tmp_path / "one.jsonl", rows[:1])))


# ====================================================================== module


def kto_module(model_dir, **kwargs) -> KTOModule:
    torch.manual_seed(0)
    module = KTOModule(
        model_name_or_path=str(model_dir), from_scratch=True, tokenizer=str(ASSETS), **kwargs
    )
    module.configure_model()
    return module


def mean(terms, key: str) -> float:
    return (terms.sums[key] / terms.counts.get(key, terms.count)).item()


def test_step_zero_is_half_the_weighted_mean_with_zero_rewards(micro_model_dir, batch):
    w_d, w_u = 1.5, 0.5
    module = kto_module(micro_model_dir, desirable_weight=w_d, undesirable_weight=w_u)
    assert module.reference.mode == "frozen_copy" and module.loss_divisor == 1.0
    terms = module.loss_terms(batch)
    assert terms.count.item() == 8
    assert (terms.loss_sum / terms.count).item() == pytest.approx(0.5 * (w_d + w_u) / 2, abs=1e-7)
    for key in ("rewards/chosen", "rewards/rejected", "kl"):
        assert terms.sums[key].item() == 0.0, key
    assert {k: v.item() for k, v in terms.counts.items()} == dict.fromkeys(
        ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"), 4
    )
    w = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0, 1.0, 1.0, 1.0])  # rows' loss weights
    weighted = module.loss_terms(dict(batch, loss_weight=w))  # in training: a weighted mean
    class_weights = torch.where(batch["label"] > 0, w_d, w_u)
    assert weighted.count.item() == w.sum().item()
    assert weighted.loss_sum.item() == pytest.approx(0.5 * (w * class_weights).sum().item())
    assert weighted.counts["rewards/chosen"].item() == (w * batch["label"]).sum().item()
    sgd_step(module, batch)  # a descent step: desirable rewards rise above undesirable ones
    after = module.loss_terms(batch)
    assert (after.loss_sum / after.count).item() < 0.5 * (w_d + w_u) / 2
    assert mean(after, "rewards/chosen") > max(0, mean(after, "rewards/rejected"))


def test_the_loss_is_wired_to_the_rows_and_their_kl_sequences(micro_model_dir, batch):
    module = kto_module(micro_model_dir, beta=BETA)
    sgd_step(module, batch)  # the policy off the reference, its KL estimate above 0
    terms = module.loss_terms(batch)

    def logps(model, prefix: str) -> torch.Tensor:  # each side alone, from the full logits
        with torch.no_grad():
            logits = model(
                input_ids=batch[f"{prefix}input_ids"],
                attention_mask=batch[f"{prefix}attention_mask"],
            ).logits
        return losses.sequence_logps(logits, batch[f"{prefix}labels"])[0]

    policy, reference = module.model, module.reference.model
    kl = (logps(policy, "kl_") - logps(reference, "kl_")).mean().clamp(min=0)
    assert kl.item() > 0
    label = batch["label"].bool()
    ref = logps(reference, "")
    expected, rewards = losses.kto_loss(logps(policy, ""), ref, label, kl, BETA)
    assert terms.loss_sum.item() == pytest.approx(expected.sum().item(), abs=1e-5)
    assert mean(terms, "kl") == pytest.approx(kl.item(), abs=1e-5)
    assert mean(terms, "rewards/chosen") == pytest.approx(rewards[label].mean().item(), abs=1e-5)
    rejected = rewards[~label].mean().item()
    assert mean(terms, "rewards/rejected") == pytest.approx(rejected, abs=1e-5)


def test_a_kl_estimate_is_reduced_over_devices(micro_model_dir):
    reduced = []

    class TwoRanks:  # the other rank's mismatched pairs: a sum of 6 over 2
        def reduce(self, tensor, reduce_op):
            reduced.append(reduce_op)
            return tensor + torch.tensor([6.0, 2.0])

    module = types.SimpleNamespace(
        _trainer=types.SimpleNamespace(world_size=2, strategy=TwoRanks())
    )
    kl = KTOModule.kl_estimate(module, t(-1.0, -2.0), t(-2.0, -5.0))  # here: 1 + 3 over 2
    assert kl.item() == pytest.approx((4 + 6) / (2 + 2)) and reduced == ["sum"]


def test_precomputed_reference_equals_the_live_one(tmp_path, micro_model_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    dm = unpaired(str(path), val_split=2, cache_dir=str(tmp_path / "cache"))
    module = kto_module(micro_model_dir, precompute_ref_logps=True)
    assert module.reference.mode == "initial_policy"
    batch = dm.collator()(rows_of(dm))
    live = module.reference_logps(batch)
    module.precompute_reference(dm)
    assert module.reference.model is None
    for split in ("train", "val"):
        assert {"ref_logps", "ref_kl_logps"} <= set(dm.datasets[split].column_names)
    stored = dm.collator()(rows_of(dm))
    assert torch.allclose(module.reference_logps(stored), live, atol=1e-5)
    terms = module.loss_terms(stored)
    assert (terms.loss_sum / terms.count).item() == pytest.approx(0.5, abs=1e-5)
    apo = kto_module(micro_model_dir, loss_type="apo_zero_unpaired", precompute_ref_logps=True)
    apo_terms = apo.loss_terms(stored)  # the KL rows' columns unused
    assert "kl" not in apo_terms.sums
    assert (apo_terms.loss_sum / apo_terms.count).item() == pytest.approx(0.5, abs=1e-5)


def test_lora_reference_is_the_base_model_with_adapters_disabled(micro_model_dir, batch):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    module = kto_module(micro_model_dir, lora=lora)
    assert module.reference.mode == "adapters_off" and module.reference.model is None
    base = copy.deepcopy(module.model).unload()
    inputs = module.scored_inputs(batch)
    with torch.no_grad():
        logits = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    expected = losses.sequence_logps(logits.logits, inputs["labels"])[0]
    before = module.reference_logps(batch)
    torch.testing.assert_close(before, expected, rtol=1e-6, atol=1e-5)
    terms = module.loss_terms(batch)  # lora_B starts at zero: the policy is the base
    assert (terms.loss_sum / terms.count).item() == pytest.approx(0.5, abs=1e-6)
    sgd_step(module, batch)
    after = module.loss_terms(batch)
    assert abs((after.loss_sum / after.count).item() - 0.5) > 1e-4
    assert torch.equal(module.reference_logps(batch), before)


# ========================================================================= fit


def test_train_py_fits_configs_kto_yaml_and_logs_the_kto_metrics(tmp_path, micro_model_dir):
    rows = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    args = {
        "--trainer.logger.init_args.save_dir": tmp_path / "runs",
        "--trainer.max_steps": 2,
        "--trainer.val_check_interval": 2,
        "--trainer.limit_val_batches": 1,
        "--trainer.log_every_n_steps": 1,
        "--trainer.enable_progress_bar": "false",
        "--trainer.callbacks.init_args.num_samples": 0,  # no sample generation
        "--model.init_args.model_name_or_path": micro_model_dir,
        "--data.init_args.train_files": rows,
        "--data.init_args.val_files": rows,
        "--data.init_args.batch_size": 4,
        "--data.init_args.max_length": 64,
        "--data.init_args.cache_dir": tmp_path / "cache",
    }
    command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", "configs/kto.yaml"]
    command += [str(x) for pair in args.items() for x in pair]
    result = subprocess.run(command, capture_output=True, cwd=ROOT, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "kto" / "version_0"
    (step, loss), *_ = scalars(run, "val/loss")
    assert step == 0 and loss == pytest.approx(0.5, abs=1e-6)  # the reference is the policy
    for tag in ("val/rewards/chosen", "val/rewards/rejected", "val/kl"):
        assert scalars(run, tag)[0][1] == pytest.approx(0.0, abs=1e-7), tag
    assert len(scalars(run, "train/loss")) == 2
    for tag in ("rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected"):
        assert len(scalars(run, f"train/{tag}")) == 2, tag
    assert len(scalars(run, "val/logps/chosen")) == 2  # steps 0 and 2
    assert (run / "hf" / "config.json").exists()
