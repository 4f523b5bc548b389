"""Preference losses: hand computations, agreement with TRL, and the DPO module's wiring.

TRL (a dev dependency, 1.16 here) is called directly where its loss code can run without a
model: ``DPOTrainer._compute_loss`` with a stub ``self`` and a fake model that returns chosen
per-token log-probabilities (the loss types sigmoid, hinge, ipo, robust and, for sigmoid
with label smoothing, aot at one pair per call, see ``trl_dpo``), ``CPOTrainer.cpo_loss``
(simpo), ``ORPOTrainer.odds_ratio_loss`` and ``ORPOTrainer.get_batch_logps``.
"""

from __future__ import annotations

import copy
import math
import types
from collections import defaultdict

import pytest
import torch

from src.datamodules import PreferenceDataModule
from src.modules import DPOModule, LoraSettings, losses
from src.modules.pairs import pair_inputs
from tests.conftest import ASSETS, write_jsonl

LN2 = math.log(2)
C, R, REF_C, REF_R = -10.0, -12.5, -11.0, -12.0  # summed log-probabilities of one pair
BETA = 0.1


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


# ====================================================================== by hand


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_sigmoid_loss_by_hand(label_smoothing):
    h = BETA * ((C - REF_C) - (R - REF_R))  # 0.1 * (1 - (-0.5)) = 0.15
    assert h == pytest.approx(0.15)
    eps = label_smoothing
    expected = (1 - eps) * softplus(-h) + eps * softplus(h)  # -(1-e) log s(h) - e log s(-h)
    chosen = t(C).requires_grad_()
    loss, r_chosen, r_rejected = losses.sigmoid_loss(
        chosen, t(R), t(REF_C), t(REF_R), beta=BETA, label_smoothing=eps
    )
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert r_chosen.item() == pytest.approx(BETA * (C - REF_C), abs=1e-12)  # 0.1
    assert r_rejected.item() == pytest.approx(BETA * (R - REF_R), abs=1e-12)  # -0.05
    assert not r_chosen.requires_grad and not r_rejected.requires_grad
    # d loss / d chosen = -beta ((1 - eps) sigmoid(-h) - eps sigmoid(h))
    loss.sum().backward()
    sig = 1 / (1 + math.exp(-h))
    assert chosen.grad.item() == pytest.approx(-BETA * ((1 - eps) * (1 - sig) - eps * sig))


def test_robust_loss_by_hand():
    h, eps = 0.15, 0.1
    expected = ((1 - eps) * softplus(-h) - eps * softplus(h)) / (1 - 2 * eps)
    loss, r_chosen, r_rejected = losses.robust_loss(
        t(C), t(R), t(REF_C), t(REF_R), beta=BETA, label_smoothing=eps
    )
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert (r_chosen.item(), r_rejected.item()) == pytest.approx((0.1, -0.05), abs=1e-12)
    no_noise = losses.robust_loss(t(C), t(R), t(REF_C), t(REF_R), beta=BETA)[0]
    assert no_noise.item() == pytest.approx(softplus(-h), abs=1e-12)  # plain DPO at eps = 0
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.robust_loss(t(C), t(R), t(REF_C), t(REF_R), label_smoothing=0.5)


def test_hinge_loss_by_hand():
    loss, r_chosen, r_rejected = losses.hinge_loss(t(C), t(R), t(REF_C), t(REF_R), beta=BETA)
    assert loss.item() == pytest.approx(1 - 0.15, abs=1e-12)
    assert (r_chosen.item(), r_rejected.item()) == pytest.approx((0.1, -0.05), abs=1e-12)
    # past the margin (beta h = 1.5 > 1) the hinge is flat
    assert losses.hinge_loss(t(C), t(R), t(REF_C), t(REF_R), beta=1.0)[0].item() == 0.0


def test_ipo_loss_by_hand_on_per_token_means():
    n_chosen, n_rejected = 4, 5
    # (1/4 - (-0.5/5) - 1/(2 * 0.1))^2 = (0.25 + 0.1 - 5)^2 = 4.65^2
    expected = ((C - REF_C) / n_chosen - (R - REF_R) / n_rejected - 1 / (2 * BETA)) ** 2
    assert expected == pytest.approx(21.6225)
    loss, r_chosen, r_rejected = losses.ipo_loss(
        t(C / n_chosen),
        t(R / n_rejected),
        t(REF_C / n_chosen),
        t(REF_R / n_rejected),
        beta=BETA,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    assert r_chosen.item() == pytest.approx(BETA * 0.25, abs=1e-12)
    assert r_rejected.item() == pytest.approx(BETA * -0.1, abs=1e-12)
    # equal margins: the loss is the squared target margin
    at_zero = losses.ipo_loss(t(C), t(R), t(C), t(R), beta=BETA)[0]
    assert at_zero.item() == pytest.approx((1 / (2 * BETA)) ** 2)


def test_simpo_loss_by_hand():
    chosen, rejected, beta, gamma = -1.2, -1.8, 2.0, 0.5
    expected = softplus(-(beta * (chosen - rejected) - gamma))  # -log sigmoid(1.2 - 0.5)
    loss, r_chosen, r_rejected = losses.simpo_loss(t(chosen), t(rejected), beta, gamma)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.7)), abs=1e-12)
    assert (r_chosen.item(), r_rejected.item()) == pytest.approx((-2.4, -3.6), abs=1e-12)


def test_orpo_loss_by_hand():
    chosen, rejected = -0.5, -1.5  # per-token means
    log_odds_chosen = chosen - math.log(1 - math.exp(chosen))
    log_odds_rejected = rejected - math.log(1 - math.exp(rejected))
    expected = BETA * softplus(-(log_odds_chosen - log_odds_rejected))
    loss, r_chosen, r_rejected = losses.orpo_loss(t(chosen), t(rejected), beta=BETA)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert (r_chosen.item(), r_rejected.item()) == pytest.approx((-0.05, -0.15), abs=1e-12)


def test_sequence_logps_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 6)
    labels = torch.tensor(
        [
            [4, -100, 2, 3, -100],  # labels[:, 0] is never a target (nothing predicts it)
            [-100, 1, 0, 5, 5],
            [-100, -100, -100, -100, -100],  # nothing to score
        ]
    )
    logps, counts = losses.sequence_logps(logits, labels)
    rows = logits.tolist()
    expected, expected_counts = [], []
    for b in range(3):
        total, n = 0.0, 0
        for step in range(4):  # logits[:, step] predicts labels[:, step + 1]
            target = labels[b, step + 1].item()
            if target == -100:
                continue
            row = rows[b][step]
            total += row[target] - math.log(sum(math.exp(x) for x in row))
            n += 1
        expected.append(total)
        expected_counts.append(n)
    assert expected_counts == [2, 4, 0]
    assert counts.tolist() == expected_counts
    assert logps.tolist() == pytest.approx(expected, abs=1e-5)
    assert logps[2].item() == 0.0
    # same shift and mask as the token cross-entropy
    ce_sum, ce_count, _ = losses.token_cross_entropy(logits, labels)
    assert ce_count.item() == 6 and ce_sum.item() == pytest.approx(-sum(expected), abs=1e-5)


# ===================================================================== vs TRL


def trl_dpo(
    loss_type: str,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    n_chosen: torch.Tensor,
    n_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[float, dict[str, list[float]]]:
    """TRL 1.16's ``DPOTrainer._compute_loss`` on given per-pair log-probabilities.

    The loss types are inlined in ``_compute_loss`` (there is no pure ``dpo_loss`` any more),
    so it runs on a stub ``self`` and a fake model whose fused-head output holds per-token
    log-probabilities that sum to ``chosen``/``rejected`` over ``n`` completion tokens (zero
    elsewhere, as TRL sums every position). The reference comes precomputed in the inputs.
    Returns the mean loss over the pairs and TRL's logged metrics.
    """
    from trl import DPOTrainer

    pairs = chosen.numel()
    lengths = torch.cat([n_chosen, n_rejected]).long()
    sums = torch.cat([chosen, rejected])
    width = int(lengths.max()) + 3  # two prompt tokens and a pad at the least
    completion_mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    per_token = torch.zeros(2 * pairs, width - 1, dtype=sums.dtype)
    for row, (n, total) in enumerate(zip(lengths.tolist(), sums, strict=True)):
        completion_mask[row, 2 : 2 + n] = 1
        per_token[row, 1 : 1 + n] = total / n  # shifted: position t predicts token t + 1
    outputs = types.SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(
            device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * pairs, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, False)
    return float(loss), {k: v[0] for k, v in stub._metrics["train"].items()}


def trl_dpo_per_pair(loss_type, pairs, beta, label_smoothing=0.0) -> torch.Tensor:
    """``trl_dpo`` one pair at a time: TRL returns only the mean over a batch."""
    return torch.tensor(
        [
            trl_dpo(loss_type, *(x[i : i + 1] for x in pairs), beta, label_smoothing)[0]
            for i in range(pairs[0].numel())
        ],
        dtype=torch.float64,
    )


def random_pairs(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Summed log-probabilities (policy and reference) of ``n`` pairs, and their lengths."""
    g = torch.Generator().manual_seed(seed)
    n_chosen, n_rejected = torch.randint(1, 40, (2, n), generator=g)
    means = -3 * torch.rand(4, n, generator=g, dtype=torch.float64) - 0.05
    chosen, rejected = means[0] * n_chosen, means[1] * n_rejected
    ref_chosen = chosen + 3 * torch.randn(n, generator=g, dtype=torch.float64)
    ref_rejected = rejected + 3 * torch.randn(n, generator=g, dtype=torch.float64)
    return chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected


def ours(loss_type, pairs, beta, label_smoothing=0.0):
    chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected = pairs
    if loss_type == "ipo":  # the DPO module passes per-token means to IPO
        return losses.ipo_loss(
            chosen / n_chosen,
            rejected / n_rejected,
            ref_chosen / n_chosen,
            ref_rejected / n_rejected,
            beta=beta,
        )
    kwargs = {"label_smoothing": label_smoothing} if loss_type in ("sigmoid", "robust") else {}
    fn = getattr(losses, f"{loss_type}_loss")
    return fn(chosen, rejected, ref_chosen, ref_rejected, beta=beta, **kwargs)


@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing"),
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.1, 0.0), ("hinge", 0.5, 0.0)]
    + [("robust", 0.1, 0.0), ("robust", 0.1, 0.2), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0)],
)
def test_dpo_family_matches_trl(loss_type, beta, label_smoothing):
    pytest.importorskip("trl")
    pairs = random_pairs()
    loss, r_chosen, r_rejected = ours(loss_type, pairs, beta, label_smoothing)
    expected = trl_dpo_per_pair(loss_type, pairs, beta, label_smoothing)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    mean, metrics = trl_dpo(loss_type, *pairs, beta, label_smoothing)
    assert loss.mean().item() == pytest.approx(mean, abs=1e-6)
    if loss_type != "ipo":  # TRL logs IPO rewards from summed log-ratios, we from means
        for key, value in [
            ("rewards/chosen", r_chosen.mean()),
            ("rewards/rejected", r_rejected.mean()),
            ("rewards/margins", (r_chosen - r_rejected).mean()),
            ("rewards/accuracies", (r_chosen > r_rejected).double().mean()),
        ]:
            assert value.item() == pytest.approx(metrics[key], abs=1e-6), key


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_label_smoothed_sigmoid_matches_trl(label_smoothing):
    """TRL 1.16's ``sigmoid`` ignores label_smoothing (only robust and EXO use it); its
    conservative-DPO formula lives on in ``aot``, which sorts the log-ratios across the
    batch: at one pair per call the sort is the identity and ``aot`` is smoothed DPO."""
    pytest.importorskip("trl")
    pairs = random_pairs(seed=1)
    loss = ours("sigmoid", pairs, 0.1, label_smoothing)[0]
    expected = trl_dpo_per_pair("aot", pairs, 0.1, label_smoothing)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (0.1, 1.0)])
def test_simpo_matches_trl_cpo(beta, gamma):
    cpo = pytest.importorskip("trl.experimental.cpo")
    chosen, rejected, _, _, n_chosen, n_rejected = random_pairs(seed=2)
    mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected
    stub = types.SimpleNamespace(
        alpha=0.0,  # no AlphaPO reward transform
        loss_type="simpo",
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=0.0,
        accelerator=types.SimpleNamespace(device="cpu"),
    )
    expected = cpo.CPOTrainer.cpo_loss(stub, mean_chosen, mean_rejected)
    result = losses.simpo_loss(mean_chosen, mean_rejected, beta=beta, gamma=gamma)
    for got, want in zip(result, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_orpo_matches_trl_odds_ratio_loss():
    orpo = pytest.importorskip("trl.experimental.orpo")
    chosen, rejected, _, _, n_chosen, n_rejected = random_pairs(seed=3)
    mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected  # in [-3.05, -0.05]
    stub = types.SimpleNamespace(beta=BETA, accelerator=types.SimpleNamespace(device="cpu"))
    # TRL returns +beta log sigmoid(log odds ratio), subtracted from the NLL by its caller;
    # it computes in float32
    trl_terms, trl_chosen, trl_rejected, *_ = orpo.ORPOTrainer.odds_ratio_loss(
        stub, mean_chosen, mean_rejected
    )
    loss, r_chosen, r_rejected = losses.orpo_loss(mean_chosen, mean_rejected, beta=BETA)
    torch.testing.assert_close(loss, -trl_terms.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r_chosen, trl_chosen.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r_rejected, trl_rejected.double(), rtol=1e-6, atol=1e-6)


def test_sequence_logps_matches_trl_get_batch_logps():
    orpo = pytest.importorskip("trl.experimental.orpo")
    torch.manual_seed(1)
    logits = torch.randn(4, 9, 11)
    labels = torch.randint(0, 11, (4, 9))
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding
    labels[3, 4:] = -100
    logps, counts = losses.sequence_logps(logits, labels)
    get_batch_logps = orpo.ORPOTrainer.get_batch_logps
    torch.testing.assert_close(logps, get_batch_logps(logits, labels), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(
        logps / counts, get_batch_logps(logits, labels, average_log_prob=True)
    )


# ============================================================== the DPO module

PAIRS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "It is Rome, I think."},
    {"prompt": "2 + 2?", "chosen": "4", "rejected": "Five, or maybe six."},
    {"prompt": "Say hi.", "chosen": "Hi there, friend!", "rejected": "No."},
    {"prompt": "Colour of the sky?", "chosen": "Blue by day.", "rejected": "Green"},
]


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict[str, torch.Tensor]:
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)
    dm = PreferenceDataModule(
        tokenizer=str(ASSETS), train_files=str(path), val_split=0, cache_dir=None, max_length=64
    )
    dm.setup("fit")
    rows = [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]
    assert len(rows) == 4
    return dm.collator()(rows)


def dpo_module(model_dir, **kwargs) -> DPOModule:
    torch.manual_seed(0)
    module = DPOModule(
        model_name_or_path=str(model_dir), from_scratch=True, tokenizer=str(ASSETS), **kwargs
    )
    module.configure_model()
    return module


def policy_logps(module: DPOModule, batch) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = pair_inputs(batch)
    with torch.no_grad():  # the module's own head path, as its reference takes
        return module.label_logps(inputs).sequence_sums()


def sgd_step(module: DPOModule, batch, lr: float = 0.5) -> None:
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    optimizer.zero_grad()
    module.loss_terms(batch).loss_sum.backward()
    optimizer.step()


def test_batch_responses_have_different_lengths(batch):
    counts = (pair_inputs(batch)["labels"][:, 1:] != -100).sum(-1)
    assert len(set(counts.tolist())) > 2  # so per-token means differ from sums


def test_dpo_starts_at_ln2_with_zero_rewards(micro_model_dir, batch):
    module = dpo_module(micro_model_dir, loss_type="sigmoid")
    terms = module.loss_terms(batch)
    assert terms.count.item() == 4
    assert (terms.loss_sum / terms.count).item() == pytest.approx(LN2, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert terms.sums[key].item() == 0.0, key
    logps = policy_logps(module, batch)[0]
    assert terms.sums["logps/chosen"].item() == pytest.approx(logps[:4].sum().item(), rel=1e-6)
    assert terms.sums["logps/rejected"].item() == pytest.approx(logps[4:].sum().item(), rel=1e-6)


def test_ipo_starts_at_the_squared_target_margin(micro_model_dir, batch):
    beta = 0.1
    module = dpo_module(micro_model_dir, loss_type="ipo", beta=beta)
    terms = module.loss_terms(batch)
    assert (terms.loss_sum / terms.count).item() == pytest.approx((1 / (2 * beta)) ** 2, abs=1e-6)


def test_reference_is_frozen_and_outside_the_checkpoint(micro_model_dir, batch):
    module = dpo_module(micro_model_dir, loss_type="sigmoid")
    reference = module.reference.model
    assert reference is not None and reference is not module.model
    ref_tensors = {p.data_ptr() for p in reference.parameters()}
    assert all(not p.requires_grad for p in reference.parameters())
    assert not any(p.data_ptr() in ref_tensors for p in module.parameters())
    state = module.state_dict()
    assert not any("reference" in key for key in state)
    assert not any(v.data_ptr() in ref_tensors for v in state.values())
    assert len(state) == len(module.model.state_dict())

    ref_before = module.reference_logps(batch).clone()
    policy_before = policy_logps(module, batch)[0]
    assert torch.equal(ref_before, policy_before)  # a copy of the initial policy
    sgd_step(module, batch)
    assert all(p.grad is None for p in reference.parameters())
    assert torch.equal(module.reference_logps(batch), ref_before)
    policy_after = policy_logps(module, batch)[0]
    assert not torch.allclose(policy_after, policy_before, atol=1e-4)
    # a descent step raises the margin of chosen over rejected
    terms = module.loss_terms(batch)
    assert (terms.loss_sum / terms.count).item() < LN2
    assert terms.sums["rewards/margins"].item() > 0


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)],
)
def test_module_loss_matches_trl_on_its_own_logps(
    micro_model_dir, batch, loss_type, label_smoothing
):
    """The module's loss (sum and normalisation wiring) equals TRL's on the module's logps."""
    pytest.importorskip("trl")
    beta = 0.5
    module = dpo_module(
        micro_model_dir, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing
    )
    with torch.no_grad():  # move the policy off the reference
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    terms = module.loss_terms(batch)
    logps, counts = policy_logps(module, batch)
    ref = module.reference_logps(batch)
    assert not torch.allclose(logps, ref, atol=1e-3)
    pairs = (*logps.chunk(2), *ref.chunk(2), *counts.chunk(2))
    pairs = tuple(x.double() for x in pairs)
    trl_type = "aot" if loss_type == "sigmoid" and label_smoothing else loss_type
    expected = trl_dpo_per_pair(trl_type, pairs, beta, label_smoothing)
    assert terms.loss_sum.item() == pytest.approx(expected.sum().item(), rel=1e-5, abs=1e-5)


def test_lora_reference_is_the_base_model_with_adapters_disabled(micro_model_dir, batch):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    module = dpo_module(micro_model_dir, loss_type="sigmoid", lora=lora)
    assert module.reference.mode == "adapters_off" and module.reference.model is None
    base = copy.deepcopy(module.model).unload()  # the base model, adapters removed by peft
    inputs = pair_inputs(batch)

    def base_logps() -> torch.Tensor:
        with torch.no_grad():
            logits = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return losses.sequence_logps(logits.logits, inputs["labels"])[0]

    expected = base_logps()
    ref_before = module.reference_logps(batch)  # lean head vs full logits: summation order
    torch.testing.assert_close(ref_before, expected, rtol=1e-6, atol=1e-5)

    terms = module.loss_terms(batch)  # lora_B starts at zero: the policy is the base
    assert (terms.loss_sum / terms.count).item() == pytest.approx(LN2, abs=1e-6)
    assert terms.sums["rewards/margins"].item() == pytest.approx(0.0, abs=1e-7)

    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    sgd_step(module, batch)
    after = module.loss_terms(batch)
    assert abs((after.loss_sum / after.count).item() - LN2) > 1e-4
    assert torch.equal(module.reference_logps(batch), ref_before)
    torch.testing.assert_close(base_logps(), expected, rtol=0, atol=0)  # the copy kept still


def test_simpo_needs_no_reference(micro_model_dir, batch):
    beta, gamma = 2.0, 0.5
    module = dpo_module(micro_model_dir, loss_type="simpo", beta=beta, gamma=gamma)
    assert module.reference is None
    assert module.sft_weight == 0.0
    terms = module.loss_terms(batch)
    logps, counts = policy_logps(module, batch)
    means = logps / counts
    expected, r_chosen, r_rejected = losses.simpo_loss(*means.chunk(2), beta=beta, gamma=gamma)
    assert terms.loss_sum.item() == pytest.approx(expected.sum().item(), rel=1e-6)
    assert terms.sums["rewards/chosen"].item() == pytest.approx(r_chosen.sum().item(), rel=1e-6)
    assert terms.sums["rewards/rejected"].item() == pytest.approx(r_rejected.sum().item(), rel=1e-6)


def test_orpo_needs_no_reference_and_adds_the_chosen_nll(micro_model_dir, batch):
    module = dpo_module(micro_model_dir, loss_type="orpo", beta=BETA)
    assert module.reference is None
    assert module.sft_weight == 1.0
    terms = module.loss_terms(batch)
    # chosen and rejected through separate forwards, not the module's concatenated one
    means = []
    for side in ("chosen", "rejected"):
        with torch.no_grad():
            logits = module.model(
                input_ids=batch[f"{side}_input_ids"],
                attention_mask=batch[f"{side}_attention_mask"],
            ).logits
        logps, counts = losses.sequence_logps(logits, batch[f"{side}_labels"])
        means.append(logps / counts)
    odds_term = losses.orpo_loss(*means, beta=BETA)[0]
    expected = odds_term.mean() - means[0].mean()  # + mean NLL per token of chosen
    assert (terms.loss_sum / terms.count).item() == pytest.approx(expected.item(), abs=1e-5)
    assert expected.item() > odds_term.mean().item() + 1  # the NLL dominates at random init
