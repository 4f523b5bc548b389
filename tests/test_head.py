"""The lean LM head trains exactly as the full logits do.

Every case runs one module twice, ``lm_head: full`` then ``lm_head: lean`` with a chunk size
of 3 (several chunks and a remainder), and compares the loss, the metric sums and the
gradient of every trainable parameter in float32. A forward hook on the head records what it
returned, so each case also shows which path ran: ``(B, T, V)`` logits for the full path,
``(N, 2)`` for the lean one (N label tokens: prompt tokens never reach the head).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

from src.errors import ConfigError
from src.modules import DPOModule, LoraSettings, PretrainModule, SFTModule, head, losses
from src.modules.pairs import pair_inputs
from tests.conftest import ASSETS
from tests.test_preference_losses import batch  # noqa: F401  (a fixture: 4 pairs)

CHUNK = 3
RTOL = 1e-5
VOCAB = 64
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": None,
    "eos_token_id": 1,
}


def assert_same_gradients(
    lean: dict[str, torch.Tensor], full: dict[str, torch.Tensor], rtol: float = RTOL
) -> None:
    """Every trainable parameter got a gradient on both paths, equal to ``rtol`` of its scale."""
    assert lean.keys() == full.keys() and full
    for name, g in full.items():
        scale = g.abs().max().item()
        assert scale > 0, f"{name} got no gradient"
        torch.testing.assert_close(lean[name], g, rtol=rtol, atol=rtol * scale, msg=name)


def model_dir(tmp_path, config_cls=LlamaConfig, **overrides):
    path = tmp_path / config_cls.model_type
    config_cls(**{**SMALL, "tie_word_embeddings": True, **overrides}).save_pretrained(path)
    return path


def build(cls, path, **kwargs):
    torch.manual_seed(0)
    module = cls(
        model_name_or_path=str(path),
        from_scratch=True,
        tokenizer=str(ASSETS),
        lm_head_chunk_size=CHUNK,
        **kwargs,
    )
    module.configure_model()
    # off the initialisation, as a pretrained model is: near-uniform predictions at init make
    # the head's gradient a difference of near-equal sums, where float32 kernels' rounding
    # differs more between a small chunk's matmul and the full one
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def sft_batch(packed: bool = False) -> dict[str, torch.Tensor]:
    """Two rows of 14 tokens: a prompt, a response of label tokens, right padding; packed,
    each row holds two sequences with restarting positions and no padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 14), generator=g)
    labels = ids.clone()
    if packed:
        labels[:, [0, 1, 7, 8]] = -100  # each sequence's prompt
        positions = torch.cat([torch.arange(7), torch.arange(7)]).repeat(2, 1)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    labels[0, :4], labels[1, :6] = -100, -100
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels[1, 11:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def head_outputs(module):
    """The shapes the model's head returns, recorded while the returned list is kept."""
    shapes = []
    hook = module.model.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: shapes.append(tuple(out.shape))
    )
    return shapes, hook


def run(module, path, inputs):
    """loss_terms and the trainable gradients under head path ``path``."""
    module.lm_head = path
    module.zero_grad(set_to_none=True)
    shapes, hook = head_outputs(module)
    try:
        terms = module.loss_terms(inputs)
    finally:
        hook.remove()
    terms.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return terms, grads, shapes


def assert_same(full, lean):
    (t_full, g_full, _), (t_lean, g_lean, _) = full, lean
    torch.testing.assert_close(t_lean.loss_sum, t_full.loss_sum, rtol=RTOL, atol=0)
    torch.testing.assert_close(t_lean.count, t_full.count, rtol=0, atol=0)
    assert t_lean.sums.keys() == t_full.sums.keys()
    for key, value in t_full.sums.items():
        # atol: rewards are beta times differences of sums in the hundreds
        torch.testing.assert_close(t_lean.sums[key], value, rtol=RTOL, atol=1e-5, msg=key)
    assert_same_gradients(g_lean, g_full)


def compare(module, inputs):
    full = run(module, "full", inputs)
    lean = run(module, "lean", inputs)
    assert_same(full, lean)
    labels = pair_inputs(inputs)["labels"] if "chosen_labels" in inputs else inputs["labels"]
    n = int((labels[:, 1:] != -100).sum())
    assert full[2] == [(*labels.shape, VOCAB)] or full[2] == [(*labels.shape, full[2][0][-1])]
    assert lean[2] == [(n, 2)], lean[2]
    return full, lean


# ------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sft_lean_equals_full(tmp_path, tied, smoothing, packed):
    module = build(
        SFTModule, model_dir(tmp_path, tie_word_embeddings=tied), label_smoothing=smoothing
    )
    compare(module, sft_batch(packed))


def test_sft_loss_weights_lean_equals_full(tmp_path):
    module = build(SFTModule, model_dir(tmp_path))
    module.train()
    data = sft_batch()
    data["loss_weights"] = torch.linspace(0.2, 2.0, 14).repeat(2, 1)
    full, _ = compare(module, data)
    plain = run(module, "full", {k: v for k, v in data.items() if k != "loss_weights"})
    assert abs(full[0].loss_sum.item() - plain[0].loss_sum.item()) > 1e-3  # weights bite


def test_linear_head_with_bias_lean_equals_full(tmp_path):
    module = build(SFTModule, model_dir(tmp_path, tie_word_embeddings=False))
    old = module.model.lm_head
    module.model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        module.model.lm_head.weight.copy_(old.weight)
        module.model.lm_head.bias.normal_(0, 0.5)
    _, lean = compare(module, sft_batch())
    assert "model.lm_head.bias" in lean[1]


def test_pretrain_lean_equals_full(tmp_path):
    module = build(PretrainModule, model_dir(tmp_path))
    data = sft_batch(packed=True)
    data["labels"] = data["input_ids"].clone()
    data["labels"][:, [0, 7]] = -100  # every token but each document's first
    compare(module, data)


# ---------------------------------------------------- families that transform logits


@pytest.mark.parametrize(
    ("config_cls", "overrides"),
    [
        (Gemma2Config, {"final_logit_softcapping": 0.5, "head_dim": 8}),  # tanh bites at 0.5
        (GraniteConfig, {"logits_scaling": 4.0}),
        (CohereConfig, {"logit_scale": 0.25}),
    ],
    ids=["gemma2-softcap", "granite-scaling", "cohere-scale"],
)
def test_families_logit_transforms_lean_equals_full(tmp_path, config_cls, overrides):
    attn = "eager" if config_cls is Gemma2Config else "sdpa"  # Gemma 2 has no sdpa path
    module = build(
        SFTModule, model_dir(tmp_path, config_cls, **overrides), attn_implementation=attn
    )
    transform = head.post_head_transform(module.model)
    assert transform != head.LogitTransform()
    compare(module, sft_batch())
    config = AutoConfig.from_pretrained(model_dir(tmp_path, config_cls, **overrides))
    for key, value in overrides.items():  # the neutral values were put back
        assert getattr(module.model.config, key) == getattr(config, key) == value
    if config_cls is CohereConfig:
        assert module.model.logit_scale == 0.25


# ------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]], ids=["body", "with-head"]
)
def test_lora_lean_equals_full(tmp_path, targets):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=targets)
    module = build(SFTModule, model_dir(tmp_path, tie_word_embeddings=False), lora=lora)
    head_module = module.model.get_output_embeddings()
    on_head = "lm_head" in targets
    assert (type(head_module) is torch.nn.Linear) != on_head  # peft wraps the head
    calls = {"chunked": 0, "checkpoint": 0}
    chunked, checkpoint = head.ChunkedHead.apply, head.checkpoint

    def count(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(head.ChunkedHead, "apply", count("chunked", chunked))
        mp.setattr(head, "checkpoint", count("checkpoint", checkpoint))
        _, lean = compare(module, sft_batch())
    n = int((sft_batch()["labels"][:, 1:] != -100).sum())
    assert calls == (
        {"chunked": 0, "checkpoint": -(-n // CHUNK)} if on_head else {"chunked": 1, "checkpoint": 0}
    )
    assert any("lora_" in name and "lm_head" in name for name in lean[1]) == on_head


# ------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("loss_type", list(losses.PREFERENCE_LOSSES))
def test_every_dpo_loss_lean_equals_full(micro_model_dir, batch, loss_type):  # noqa: F811
    module = build(DPOModule, micro_model_dir, loss_type=loss_type, beta=0.5)
    if module.objective.needs_reference:  # the policy moved off its reference copy
        policy = module.label_logps(pair_inputs(batch)).sequence_sums()[0]
        assert not torch.allclose(module.reference_logps(batch), policy, atol=1e-3)
    compare(module, batch)


def test_dpo_reference_log_probs_lean_equal_full(micro_model_dir, batch):  # noqa: F811
    module = build(DPOModule, micro_model_dir, loss_type="sigmoid")
    values = {}
    for path in ("full", "lean"):
        module.lm_head = path
        values[path] = module.reference_logps(batch)
    torch.testing.assert_close(values["lean"], values["full"], rtol=RTOL, atol=0)


# ------------------------------------------------------------------ chunked function


@pytest.mark.parametrize(
    "transform",
    [head.LogitTransform(), head.LogitTransform(0.5, None), head.LogitTransform(2.0, 1.5)],
    ids=["identity", "scale", "scale-cap"],
)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_chunked_head_matches_log_softmax_by_hand(transform, bias):
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab = 11, 8, 20
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.randn(n, 2, generator=g)

    out, correct = head.ChunkedHead.apply(h, w, b, targets, 4, True, transform)
    (out * upstream).sum().backward()
    lean = [x.grad.clone() for x in (h, w, b) if x is not None]
    for x in (h, w, b):
        if x is not None:
            x.grad = None

    z = transform(h @ w.t() + (b if bias else 0))
    logprobs = torch.log_softmax(z, -1)
    expected = torch.stack([logprobs.gather(1, targets[:, None])[:, 0], logprobs.mean(-1)], 1)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=1e-6)
    assert torch.equal(correct, z.argmax(-1) == targets)
    for got, want in zip(lean, [x.grad for x in (h, w, b) if x is not None], strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-6)


def test_no_label_tokens_give_a_zero_loss_and_zero_gradients(tmp_path):
    module = build(SFTModule, model_dir(tmp_path))
    data = sft_batch()
    data["labels"][:] = -100
    module.lm_head = "lean"
    terms = module.loss_terms(data)
    terms.loss_sum.backward()
    assert terms.loss_sum.item() == 0 and terms.count.item() == 0
    assert all(p.grad is None or not p.grad.any() for p in module.parameters())


def test_chunk_size_below_one_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="lm_head_chunk_size must be at least 1, got 0"):
        SFTModule(model_name_or_path=str(model_dir(tmp_path)), lm_head_chunk_size=0)
