"""Build ``arith.jsonl``, the demo lm-eval tasks' documents, from the demo SFT validation set.

Each single-turn addition question of ``data/demo/sft_val.jsonl`` becomes a document with its
answer (``target``) and four choices: the sum and three near misses, in a fixed shuffled
order (``answer`` is the index of the sum). Run from the repository root:
``python data/demo/lm_eval/make_arith.py``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "sft_val.jsonl"
QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?|Add (\d+) and (\d+)\.|Compute (\d+) plus (\d+)\.")


def documents(lines: list[str]) -> list[dict]:
    docs = []
    for line in lines:
        messages = json.loads(line)["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        match = QUESTION.fullmatch(users[0]) if len(users) == 1 else None
        if match is None:
            continue
        a, b = (int(n) for n in match.groups() if n is not None)
        total = a + b
        if messages[-1]["content"] != str(total):
            raise ValueError(f"{SOURCE}: {users[0]!r} is answered {messages[-1]['content']!r}")
        misses = [total + 1, total - 1 if total > 0 else total + 2, total + 10]
        choices = [str(n) for n in [total, *misses]]
        random.Random(len(docs)).shuffle(choices)
        docs.append(
            {
                "question": users[0],
                "choices": choices,
                "answer": choices.index(str(total)),
                "target": str(total),
            }
        )
    return docs


def main() -> None:
    docs = documents(SOURCE.read_text(encoding="utf-8").splitlines())
    out = HERE / "arith.jsonl"
    out.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    print(f"{len(docs)} documents -> {out}")


if __name__ == "__main__":
    main()
