"""Build ``assets/tiny-llama/``: a byte-level BPE tokenizer and a tiny Llama config.

The tokenizer is trained with the ``tokenizers`` library on all the text in ``data/demo``
(run ``scripts/build_demo_data.py`` first): white space, punctuation and digits are split
into tokens of their own, then a GPT-2 style byte-level pre-tokenizer, decoder and
post-processor (``trim_offsets=False`` so that offset mappings are exact character offsets).
Special tokens: ``<|endoftext|>`` (pad), ``<|im_start|>`` and ``<|im_end|>`` (eos); there is
no BOS token. The chat template is ChatML in the Qwen2.5 style without a default system
prompt.

The model config is a ``LlamaConfig`` (no weights are saved: the template initialises the
model from the config), plus a ``generation_config.json`` that stops on ``<|im_end|>``.
Both load offline::

    AutoTokenizer.from_pretrained("assets/tiny-llama")
    AutoConfig.from_pretrained("assets/tiny-llama")

The build is deterministic: the tokenizer is trained twice and the results are compared.

Usage: ``python scripts/build_assets.py [--data data/demo] [--out assets/tiny-llama]``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# ChatML as in Qwen2.5 (tool calls included), without the default system prompt.
CHAT_TEMPLATE = (REPO_ROOT / "src/datamodules/templates/chatml.jinja").read_text(encoding="utf-8")


def iter_strings(value: object) -> Iterator[str]:
    """Every string value in a parsed JSON object (message contents, roles, fields, ...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from iter_strings(item)


def load_corpus(data_dir: Path) -> list[str]:
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no *.jsonl in {data_dir}: run scripts/build_demo_data.py first")
    texts: list[str] = []
    for path in files:
        with path.open(encoding="utf-8") as f:
            for line in f:
                texts.extend(s for s in iter_strings(json.loads(line)) if s)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # White space and punctuation are tokens of their own, so a word is the same token
    # wherever it stands (" goat" and "goat" are not two tokens): copying tasks are learnable
    # by a tiny model in minutes.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    return hf_tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """``save_pretrained``, then make ``tokenizer_config.json`` loadable by transformers 4 too.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, a list-valued
    ``extra_special_tokens`` and a separate ``chat_template.jinja``; transformers 4 knows
    none of these. The portable spelling below is read the same way by both (checked with
    transformers 4.57 and 5.23).
    """
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("backend", None)
    config.pop("extra_special_tokens", None)
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token=None,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def build_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=round_up(len(tokenizer), args.pad_vocab_to),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=args.rms_norm_eps,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def check_offsets(tokenizer: PreTrainedTokenizerFast) -> None:
    """Offsets must be exact character offsets, also around special tokens and newlines."""
    messages = [
        {"role": "system", "content": "Answer in uppercase."},
        {"role": "user", "content": "Reverse the words: apple river stone"},
        {"role": "assistant", "content": "STONE RIVER APPLE"},
        {"role": "user", "content": "What is 23 + 48?\n\nThanks, déjà vu"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = [tuple(span) for span in enc["offset_mapping"]]
    # The bytes of a multi-byte character may be split over several tokens: each of them
    # then carries the span of the whole character, so repeated spans are merged first.
    spans = [span for i, span in enumerate(offsets) if i == 0 or span != offsets[i - 1]]
    assert "".join(text[start:end] for start, end in spans) == text, "offsets do not tile"
    for token_id, (start, end) in zip(enc["input_ids"], offsets, strict=True):
        decoded = tokenizer.decode([token_id])
        assert decoded == text[start:end] or "\ufffd" in decoded, (token_id, decoded)
    assert tokenizer.decode(enc["input_ids"]) == text, "decode(encode(text)) != text"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "demo")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "assets" / "tiny-llama")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE target size")
    parser.add_argument("--pad-vocab-to", type=int, default=64, help="round the model vocab up")
    parser.add_argument("--model-max-length", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--num-hidden-layers", type=int, default=4)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--num-key-value-heads", type=int, default=2)
    parser.add_argument("--max-position-embeddings", type=int, default=1024)
    parser.add_argument("--rms-norm-eps", type=float, default=1e-5)
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    texts = load_corpus(args.data)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    if tokenizer.to_str() != train_tokenizer(texts, args.vocab_size).to_str():
        raise SystemExit("tokenizer training is not deterministic")

    args.out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(wrap_tokenizer(tokenizer, args.model_max_length), args.out)
    hf_tokenizer = AutoTokenizer.from_pretrained(args.out)  # what users will load
    check_offsets(hf_tokenizer)

    config = build_config(args, hf_tokenizer)
    config.save_pretrained(args.out)
    GenerationConfig(
        bos_token_id=None,
        eos_token_id=hf_tokenizer.eos_token_id,
        pad_token_id=hf_tokenizer.pad_token_id,
    ).save_pretrained(args.out)

    config = AutoConfig.from_pretrained(args.out)
    n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    ids = {t: hf_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    print(f"corpus: {len(texts):,} strings from {args.data}")
    print(f"tokenizer: {len(hf_tokenizer)} tokens (model vocab {config.vocab_size}), ids {ids}")
    print(f"config: LlamaForCausalLM with {n_params:,} parameters (tied embeddings)")
    for path in sorted(args.out.iterdir()):
        print(f"  {path.name:<26} {path.stat().st_size:>9,} bytes")


if __name__ == "__main__":
    main()
