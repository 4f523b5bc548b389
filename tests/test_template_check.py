"""The chat-template check: a good template passes, each broken behaviour is reported."""

from __future__ import annotations

import io

import pytest
from transformers import PreTrainedTokenizerFast

from src.datamodules.chat import ChatEncoder, generation_stop_ids
from src.datamodules.template_check import PROBES, check_template
from src.preview import main
from tests.chat_families import FAMILIES, build
from tests.conftest import ASSETS, ROOT, save_chat_tokenizer

# A Phi-3-style template: turns close with <|end|>, the conversation with the EOS.
PHI_LIKE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)
BROKEN = {
    # turns end with nothing the tokenizer knows as a token
    "no end-of-turn token": (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
        "no end-of-turn token",
    ),
    # add_generation_prompt forgotten: the assistant header is part of the turn
    "no generation prompt": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
        "+ '<|im_end|>\\n' }}{% endfor %}",
        "a header is trained",
    ),
    # the system prompt is silently left out
    "drops the system prompt": (
        "{% for m in messages if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] "
        "+ '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "the template drops the system prompt",
    ),
    # a rendering that changes from call to call (a clock in the template)
    "renders differently each call": (
        "{{ '<|im_start|>system\\nNow: ' + strftime_now('%H:%M:%S.%f') + '<|im_end|>\\n' }}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
        "+ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "ids differ from apply_chat_template",
    ),
    # a template that raises on every conversation
    "rejects everything": (
        "{{ raise_exception('this template takes no conversation') }}",
        "the template rejects it: ",
    ),
}


def run_check(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(["--check-template", *args], out=out), out.getvalue()


def test_the_shipped_template_passes_every_probe():
    rc, text = run_check("--tokenizer", str(ASSETS))
    assert rc == 0, text
    assert text.strip().endswith("all probes pass")
    assert "FAIL" not in text
    for probe in PROBES:
        assert f"probe: {probe}" in text
    # the trained text of every turn, its stop token marked
    assert "turn 1 trained: '4⟦<|im_end|>⟧'" in text
    assert "turn 3 trained: 'blue⟦<|im_end|>⟧'" in text
    call = '<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>'
    assert f"turn 1 trained: '{call}⟦<|im_end|>⟧'" in text
    assert "same ids as apply_chat_template(tokenize=True)" in text


def test_the_check_reads_a_training_config():
    rc, text = run_check("--config", str(ROOT / "configs" / "sft.yaml"))
    assert rc == 0, text
    assert "all probes pass" in text


@pytest.mark.parametrize("name", list(BROKEN))
def test_each_broken_behaviour_fails_the_check(tokenizer, tmp_path, name):
    template, message = BROKEN[name]
    rc, text = run_check("--tokenizer", save_chat_tokenizer(tokenizer, tmp_path, template))
    assert rc == 1, text
    assert message in text
    assert "probe(s) failed" in text


def test_a_last_turn_closed_by_a_token_generation_does_not_stop_on_fails(tokenizer, tmp_path):
    """Phi-3-style turns close with <|end|>; a tokenizer whose EOS and generation config
    name only another token would train a stop that inference ignores."""
    path = save_chat_tokenizer(
        tokenizer, tmp_path, PHI_LIKE, ("<|end|>", "<|user|>", "<|assistant|>")
    )
    rc, text = run_check("--tokenizer", path)
    assert rc == 1
    assert "ends with <|end|>, which generation does not stop on" in text
    assert "turn 1 trained: '4⟦<|end|>⟧'" in text  # never the EOS written after the turn
    rc, text = run_check("--tokenizer", path, "--stop-token", "<|end|>")
    assert rc == 0, text
    end_id = PreTrainedTokenizerFast.from_pretrained(path).convert_tokens_to_ids("<|end|>")
    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": [{end_id}]}}')
    rc, text = run_check("--tokenizer", path)
    assert rc == 0, text  # the token of generation_config.json's eos_token_id


def test_generation_stops_on_what_closes_the_last_turn(tokenizer, tmp_path):
    path = save_chat_tokenizer(
        tokenizer, tmp_path, PHI_LIKE, ("<|end|>", "<|user|>", "<|assistant|>")
    )
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert set(generation_stop_ids(tok)) == {tok.eos_token_id, end}


def test_check_template_returns_the_verdict(tokenizer):
    assert check_template(ChatEncoder(tokenizer), io.StringIO()) is True


# What the check finds in the templates of the 18 families: the real behaviour of each.
FAMILY_FAILURES = {
    "mistral-v0.3": ["system prompt"],  # kept only when the last message is the user's
    "mistral-nemo": ["system prompt"],
    "deepseek-r1-distill": ["tool call and result"],  # calls rendered only for content None
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_check_on_the_template_families(tokenizer, name):
    family = FAMILIES[name]
    encoder = ChatEncoder(build(family, tokenizer), stop_tokens=list(family.stop))
    out = io.StringIO()
    passed = check_template(encoder, out)
    text = out.getvalue()
    failures = FAMILY_FAILURES.get(name, [])
    assert passed == (not failures), text
    if failures:
        assert f"probe(s) failed: {', '.join(failures)}" in text
    assert "a header is trained" not in text
    assert "no end-of-turn token" not in text
