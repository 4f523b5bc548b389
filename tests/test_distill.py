"""Logit distillation: the divergences by hand and against TRL, the lean head against full
logits, the teacher's life cycle and refusals, and one fit of configs/distill.yaml.

Lean and full run one module twice and compare the loss, the metric sums and the gradient of
every trainable parameter, as tests/test_head.py does; forward hooks on both heads record
what they returned, so each case also shows which path ran: full ``(B, T, V)`` logits, or
the student's ``(N, 3)`` per-token results and the teacher's empty output (its head kept the
label positions' hidden states instead of computing logits).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config, LlamaConfig

from src.errors import ConfigError, PathNotFoundError
from src.modules import DistillationModule, LoraSettings, distill, head
from tests.conftest import ASSETS, ROOT, conversation, save_chat_tokenizer, write_jsonl
from tests.test_e2e import scalars
from tests.test_head import SMALL, assert_same_gradients, sft_batch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

CHUNK = 3
RTOL = 1e-4  # float32 sums in another order (chunks, threads): 1e-5 flaked on 2 processes
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def save_model(path, seed, config_cls=LlamaConfig, **overrides):
    """A small model with weights moved off their initialisation (a trained model's
    predictions are far from uniform), saved to ``path``."""
    config = config_cls(**{**SMALL, "tie_word_embeddings": False, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return str(path)


def build(student, teacher, **kwargs):
    module = DistillationModule(
        model_name_or_path=student,
        teacher_name_or_path=teacher,
        tokenizer=str(ASSETS),
        lm_head_chunk_size=CHUNK,
        **kwargs,
    )
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A student and a teacher whose heads have different row counts (the teacher's vocabulary
    padded past the tokenizer's 1088 tokens); the student's is resized to the tokenizer."""
    root = tmp_path_factory.mktemp("distill")
    return save_model(root / "student", 0), save_model(root / "teacher", 1, vocab_size=1100)


def run(module, path, inputs):
    """loss_terms and the trainable gradients on head path ``path``, and the shapes both
    heads returned."""
    module.lm_head = path
    module.zero_grad(set_to_none=True)
    shapes = {"student": [], "teacher": []}
    hooks = [
        model.get_output_embeddings().register_forward_hook(
            lambda _m, _i, out, key=key: shapes[key].append(tuple(out.shape))
        )
        for key, model in (("student", module.model), ("teacher", module.teacher.model))
    ]
    try:
        terms = module.loss_terms(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    terms.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return terms, grads, shapes


def compare(module, inputs):
    """Lean equals full (loss, metric sums, every gradient), and each path ran as it says."""
    (t_full, g_full, s_full), (t_lean, g_lean, s_lean) = (
        run(module, path, inputs) for path in ("full", "lean")
    )
    torch.testing.assert_close(t_lean.loss_sum, t_full.loss_sum, rtol=RTOL, atol=0)
    assert t_lean.count == t_full.count
    assert t_lean.sums.keys() == t_full.sums.keys() == {"divergence", "nll", "token_accuracy"}
    for key, value in t_full.sums.items():
        torch.testing.assert_close(t_lean.sums[key], value, rtol=RTOL, atol=1e-6, msg=key)
    assert_same_gradients(g_lean, g_full, rtol=RTOL)
    labels = inputs["labels"]
    n = int((labels[:, 1:] != -100).sum())
    student_rows = module.model.get_output_embeddings().weight.shape[0]
    teacher_rows = module.teacher.model.get_output_embeddings().weight.shape[0]
    assert s_full == {
        "student": [(*labels.shape, student_rows)],
        "teacher": [(*labels.shape, teacher_rows)],
    }
    assert s_lean["student"] == [(n, 3)] and s_lean["teacher"] == [(0,)]
    return t_lean


# ------------------------------------------------------------------- the divergences


def logits_pair(n=5, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 2, torch.randn(n, vocab, generator=g) * 2


def test_each_divergence_by_hand():
    student, teacher = logits_pair()
    temperature, beta = 2.0, 0.3
    p_s = torch.softmax(student / temperature, -1)
    p_t = torch.softmax(teacher / temperature, -1)
    forward = (p_t * (p_t.log() - p_s.log())).sum(-1)
    reverse = (p_s * (p_s.log() - p_t.log())).sum(-1)
    m = beta * p_t + (1 - beta) * p_s
    jsd = beta * (p_t * (p_t.log() - m.log())).sum(-1) + (1 - beta) * (
        p_s * (p_s.log() - m.log())
    ).sum(-1)
    for name, expected in (("forward_kl", forward), ("reverse_kl", reverse), ("jsd", jsd)):
        got = distill.token_divergence(student, teacher, name, beta, temperature)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=name)
        assert (got > 1e-3).all()
    for beta_end, same in ((0.0, forward), (1.0, reverse)):  # JSD's ends: the two KLs
        got = distill.token_divergence(student, teacher, "jsd", beta_end, temperature)
        torch.testing.assert_close(got, same, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("divergence", "beta", "trl_beta"),
    [
        ("jsd", 0.0, 0.0),
        ("jsd", 0.5, 0.5),
        ("jsd", 1.0, 1.0),
        ("forward_kl", 0.5, 0.0),
        ("reverse_kl", 0.5, 1.0),
    ],
)
def test_agrees_with_trl_generalized_jsd(divergence, beta, trl_beta):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher = (x.reshape(2, 6, 9) for x in logits_pair(12, 9, seed=3))
    labels = torch.randint(0, 9, (2, 6))
    labels[0, :2] = -100
    mask = labels != -100
    trl = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels, beta=trl_beta, temperature=1.7, reduction="batchmean"
    )
    ours = distill.token_divergence(student[mask], teacher[mask], divergence, beta, 1.7)
    torch.testing.assert_close(ours.mean(), trl, rtol=1e-6, atol=1e-6)
    per_token = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels, beta=trl_beta, temperature=1.7, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(ours, per_token, rtol=1e-6, atol=1e-6)


def test_heads_of_different_row_counts_compare_over_the_common_rows():
    student, teacher = logits_pair(vocab=9)
    padded = torch.cat([teacher, torch.full((5, 3), -1.0)], 1)  # 3 more rows in the teacher
    got = distill.token_divergence(student, padded, "jsd", 0.5)
    torch.testing.assert_close(got, distill.token_divergence(student, teacher, "jsd", 0.5))


# ----------------------------------------------------------- the module, lean and full


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
def test_lean_equals_full_for_every_divergence(pair, divergence, beta):
    module = build(*pair, divergence=divergence, beta=beta, temperature=1.5)
    assert module.teacher.mode == "separate"
    terms = compare(module, sft_batch())
    assert terms.sums["divergence"] > 1e-2  # two different models


@pytest.mark.parametrize("sharded", [False, True], ids=["teacher-hidden", "teacher-logits"])
def test_lean_equals_full_with_nll_mixing_and_loss_weights(pair, monkeypatch, sharded):
    """With ``sharded`` the teacher's head computes its label logits inside its forward (what
    FSDP and ZeRO-3 need); either way the mixed loss and its gradients equal full logits'."""
    module = build(*pair, nll_weight=0.3).train()
    if sharded:
        monkeypatch.setattr(distill, "attached_strategy", lambda _: object())
        monkeypatch.setattr(distill, "parameters_are_sharded", lambda _: True)
    captured = []

    def kept(*args, **kwargs):  # what the teacher's head kept
        captured.append(head.label_logits(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(distill, "label_logits", kept)
    data = sft_batch()
    data["loss_weights"] = torch.linspace(0.2, 2.0, 14).repeat(2, 1)
    terms = compare(module, data)
    lean = captured[-1]
    assert (lean.logits is not None) == sharded and (lean.hidden is None) == sharded
    weighted = (1 - 0.3) * terms.sums["divergence"] + 0.3 * terms.sums["nll"]
    torch.testing.assert_close(terms.loss_sum, weighted, rtol=1e-6, atol=1e-6)
    mask = data["labels"][:, 1:] != -100
    torch.testing.assert_close(terms.count, data["loss_weights"][:, 1:][mask].sum())


def test_family_logit_transforms_of_both_models(tmp_path):
    """Gemma 2's soft-capping in both models goes into the chunks (student and teacher)."""
    config = {"final_logit_softcapping": 0.5, "head_dim": 8}
    student = save_model(tmp_path / "s", 0, Gemma2Config, **config)
    teacher = save_model(tmp_path / "t", 1, Gemma2Config, **config)
    module = build(student, teacher, attn_implementation="eager", divergence="jsd")
    assert head.post_head_transform(module.teacher.model) == head.LogitTransform(cap=0.5)
    compare(module, sft_batch())


def test_lora_student_with_an_adapter_on_the_head(pair, monkeypatch):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])
    module = build(*pair, lora=lora, divergence="reverse_kl")
    with torch.no_grad():  # off the initialisation's zero update, which gives lora_A no gradient
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    mapped = mock.Mock(wraps=head.ChunkedMap.apply)
    checkpointed = mock.Mock(wraps=head.checkpoint)
    monkeypatch.setattr(head.ChunkedMap, "apply", mapped)
    monkeypatch.setattr(head, "checkpoint", checkpointed)
    module.lm_head = "lean"
    module.loss_terms(sft_batch()).loss_sum.backward()
    grads = [n for n, p in module.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)
    assert any("lm_head" in n for n in grads)
    n = int((sft_batch()["labels"][:, 1:] != -100).sum())
    # chunk by chunk under checkpointing: a LoRA head is no nn.Linear for ChunkedMap
    assert (mapped.call_count, checkpointed.call_count) == (0, -(-n // CHUNK))
    compare(module, sft_batch())


def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient(pair):
    student, _ = pair
    module = build(student, student, from_scratch=False)
    for divergence, beta in DIVERGENCES:
        module.divergence, module.beta = divergence, beta
        terms, grads, _ = run(module, "lean", sft_batch())
        assert abs(terms.loss_sum.item()) < 1e-5, divergence
        assert grads and all(g.abs().max() < 1e-6 for g in grads.values()), divergence
    module.nll_weight = 0.5  # the cross-entropy still pulls: the zero above is the divergence's
    terms, grads, _ = run(module, "lean", sft_batch())
    assert terms.loss_sum > 1 and max(g.abs().max() for g in grads.values()) > 1e-3


def test_bfloat16_teacher(pair):
    module = build(*pair, teacher_dtype="bfloat16")
    assert {p.dtype for p in module.teacher.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in module.teacher.model.parameters())
    assert not module.teacher.model.training
    module.lm_head = "lean"
    kept = module.teacher_logits(sft_batch())
    assert kept.hidden.dtype == kept.weight.dtype == kept.dtype == torch.bfloat16
    exact = build(*pair)  # a float32 teacher: the same numbers to bf16's precision
    loss = module.loss_terms(sft_batch()).loss_sum
    torch.testing.assert_close(loss, exact.loss_terms(sft_batch()).loss_sum, rtol=2e-2, atol=0)


def test_a_float32_teacher_of_a_bfloat16_student_is_read_in_float32(pair):
    """The teacher is loaded in its own dtype, not the student's and then cast: its weights
    are exactly the checkpoint's."""
    from safetensors.torch import load_file

    module = build(*pair, torch_dtype="bfloat16", teacher_dtype="float32")
    saved = load_file(Path(pair[1]) / "model.safetensors")
    teacher = module.teacher.model.state_dict()
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    for name, value in saved.items():
        assert torch.equal(teacher[name], value), name


def test_predict_needs_no_teacher(pair, tmp_path):
    """Generation from a distilled student runs without its teacher on disk."""
    module = DistillationModule(
        model_name_or_path=pair[0], teacher_name_or_path=str(tmp_path / "gone"),
        tokenizer=str(ASSETS),
    )  # fmt: skip
    module.trainer = SimpleNamespace(predicting=True, strategy=None)
    module.configure_model()
    assert module.model is not None and module.teacher.model is None
    module.trainer = SimpleNamespace(predicting=False, strategy=None)
    module.model = None
    with pytest.raises(PathNotFoundError, match="teacher_name_or_path"):
        module.configure_model()


# ------------------------------------------------------------------------- refusals


def test_a_teacher_with_another_tokenizer_is_refused(pair, tokenizer, tmp_path):
    student, teacher = pair
    other = tmp_path / "other"
    save_model(other, 1)
    save_chat_tokenizer(tokenizer, other, "{{ messages }}", extra=("<|tool|>",))
    with pytest.raises(ConfigError) as err:
        build(student, str(other))
    message = str(err.value)
    assert str(other) in message and str(ASSETS) in message
    assert "tokens differ" in message and "special tokens differ" in message
    tokenizer.save_pretrained(teacher)  # the student's own tokenizer: accepted
    assert build(student, teacher).teacher.model is not None


def test_a_missing_teacher_names_the_setting_and_the_sft_demo(pair, tmp_path):
    missing = tmp_path / "runs" / "sft" / "version_0" / "hf"
    with pytest.raises(PathNotFoundError) as err:
        build(pair[0], str(missing))
    message = str(err.value)
    assert str(missing) in message and "model.init_args.teacher_name_or_path" in message
    assert "python train.py fit --config configs/sft.yaml" in message


def test_bad_settings_are_refused(pair):
    for bad, words in (
        ({"divergence": "kl"}, "unknown divergence 'kl'"),
        ({"beta": 1.5}, "in [0, 1]"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"nll_weight": -0.1}, "nll_weight"),
    ):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            DistillationModule(
                model_name_or_path=pair[0], teacher_name_or_path=pair[1], tokenizer=str(ASSETS),
                **bad,
            )  # fmt: skip


# ---------------------------------------------------------------------- end to end


def test_fit_of_configs_distill_yaml(tmp_path, micro_model_dir, tokenizer):
    teacher = tmp_path / "teacher"
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir))
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    rows = [conversation(f"what is {i} + 1?", f"{i + 1}") for i in range(24)]
    train, val = write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows)
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config",
         str(ROOT / "configs" / "distill.yaml"),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
         "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
         "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.log_every_n_steps", "1",
         "--model.init_args.model_name_or_path", str(micro_model_dir),
         "--model.init_args.teacher_name_or_path", str(teacher),
         "--data.init_args.train_files", str(train), "--data.init_args.val_files", str(val),
         "--data.init_args.batch_size", "4", "--data.init_args.max_length", "64",
         "--data.init_args.cache_dir", str(tmp_path / "cache")],
        capture_output=True, cwd=ROOT, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "distill" / "version_0"
    for tag in ("val/nll", "val/divergence", "val/token_accuracy", "val/loss"):
        values = scalars(run_dir, tag)
        assert [s for s, _ in values] == [0, 1], tag  # step 0 and after the last step
        assert all(v >= 0 for _, v in values), tag
    assert scalars(run_dir, "val/divergence")[0][1] > 1e-3  # the two models differ
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    student = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert sorted(k.removeprefix("model.") for k in state) == sorted(student.state_dict())
    assert not any("teacher" in k for k in state)
