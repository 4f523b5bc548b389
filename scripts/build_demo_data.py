"""Build the small synthetic demo datasets in ``data/demo/``.

Every file is JSON Lines (one UTF-8 object a line) and is fully determined by ``--seed``:

* ``sft_{train,val}.jsonl``        ``{"messages": [{"role", "content"}, ...]}`` chats
  (single-turn tasks, two-turn follow-ups, a system prompt on ~20% of them).
* ``alpaca_{train,val}.jsonl``     ``{"instruction", "input", "output"}`` (+ ``"system"``
  on some rows): single-turn versions of the same tasks.
* ``pretrain_{train,val}.jsonl``   ``{"text"}`` plain-prose documents (20-200 words) made
  of simple template sentences, fixed "facts" and ``Q: ... A: ...`` worked examples.
* ``preference_{train,val}.jsonl`` ``{"prompt", "chosen", "rejected"}`` where ``rejected``
  is a plausible wrong answer (sum off by a little, two numbers swapped, ...).
* ``kto_{train,val}.jsonl``        ``{"prompt", "completion", "label"}`` unpaired rows (KTO):
  each preference pair as two consecutive rows, chosen with ``label`` true, rejected false.
* ``grpo_{train,val}.jsonl``       ``{"prompt", "answer", "task"}`` prompts for online RL:
  additions, word counts, first / last words, reversals and uppercasing (answers a program
  checks exactly), none of them in a validation file or in SFT's training file.

The tasks are tiny and learnable by a few-million-parameter model in minutes on a CPU:
reverse words, sort numbers, add two numbers, uppercase a phrase, first / last word or
word count, and two-turn follow-ups ("Now add 5 to that.", "Now uppercase it.", ...).
A system prompt such as "Answer in uppercase." changes the answer in a learnable way.
All words come from a fixed vocabulary of 150 short English words; phrases are short (1-4
words) and numbers small (additions of two numbers below 70, sorts of 2-3 numbers below 50).

No problem (task + payload) that occurs in any validation file occurs in any training
file, and no problem repeats within a file. Only the standard library is used.

Usage: ``python scripts/build_demo_data.py [--out data/demo] [--seed 1234]``
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def wordlist(text: str) -> list[str]:
    return text.split()


def mapping(text: str) -> dict[str, str]:
    """``"a:b c:d"`` -> ``{"a": "b", "c": "d"}``."""
    return dict(item.split(":") for item in text.split())


COLOURS = wordlist("red blue green yellow black white brown pink purple gray gold silver")
ANIMALS = wordlist(
    "cat dog fox bird fish frog horse cow pig sheep goat duck owl bee ant bear wolf lion "
    "tiger mouse rabbit deer snake whale crab hen seal goose eagle monkey"
)
FRUITS = wordlist(
    "apple banana cherry grape lemon lime mango melon peach pear plum berry kiwi fig "
    "coconut apricot olive papaya guava nut"
)
OBJECTS = wordlist(
    "book cup chair table door window lamp clock key box ball hat shoe sock bag bed pen "
    "coin ring bell boat car bus train kite drum spoon fork plate bowl bottle brush comb "
    "rope candle mirror basket ladder wheel house"
)
NATURE = wordlist(
    "river stone tree sun moon star cloud rain snow wind hill lake sea sand leaf flower "
    "grass rock forest field"
)
VERBS = wordlist(
    "runs sings sleeps jumps swims eats sits flies walks reads hides plays waits rests "
    "dances climbs"
)
ADJECTIVES = wordlist("big small old new fast slow happy sad tall short soft loud")
NOUNS = ANIMALS + FRUITS + OBJECTS + NATURE
VOCAB = COLOURS + ANIMALS + FRUITS + OBJECTS + NATURE + VERBS + ADJECTIVES

# Fixed "facts" stated in the pretraining prose.
FRUIT_COLOUR = mapping(
    "apple:red banana:yellow cherry:red grape:purple lemon:yellow lime:green mango:gold "
    "melon:green peach:pink pear:green plum:purple berry:blue kiwi:brown fig:purple "
    "coconut:brown apricot:gold olive:black papaya:gold guava:pink nut:brown"
)
ANIMAL_HOME = mapping(
    "cat:house dog:house fox:forest bird:tree fish:sea frog:lake horse:field cow:field "
    "pig:field sheep:hill goat:hill duck:lake owl:tree bee:flower ant:grass bear:forest "
    "wolf:forest lion:grass tiger:forest mouse:house rabbit:field deer:forest snake:grass "
    "whale:sea crab:sand hen:field seal:sea goose:lake eagle:hill monkey:tree"
)
assert len(set(VOCAB)) == len(VOCAB) == 150
assert sorted(FRUIT_COLOUR) == sorted(FRUITS) and sorted(ANIMAL_HOME) == sorted(ANIMALS)

NEUTRAL_SYSTEMS = [
    "You are a terse assistant.",
    "You are a helpful assistant.",
    "Answer briefly.",
    "You are a small and precise assistant.",
]
UPPER_SYSTEMS = ["Answer in uppercase.", "Always reply in capital letters."]
SYSTEM_RATE = 0.2
ALPACA_SELF_CONTAINED_RATE = 0.25

SINGLE_TASKS = ["reverse", "sort", "add", "upper", "words"]
CHAT_TASKS = [*SINGLE_TASKS, "multi"]
WORD_TASKS = ["first", "last", "count"]
FOLLOW_UPS = ["add_more", "reverse_upper", "first_last"]

Message = dict[str, str]


@dataclass(frozen=True)
class Problem:
    """One task instance, renderable as a chat turn, an Alpaca row or a Q/A line."""

    task: str
    payload: str  # the words / numbers the task operates on
    prompt: str  # self-contained user message
    instruction: str  # Alpaca instruction used together with ``payload`` as input
    answer: str
    wrong: str  # plausible but incorrect answer

    @property
    def key(self) -> str:
        return f"{self.task}|{self.payload}"


@dataclass(frozen=True)
class Conversation:
    messages: list[Message]  # ends with the assistant answer
    wrong: str  # plausible wrong version of the last assistant answer


# ----------------------------------------------------------------------------- helpers


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def swap(items: list[str], i: int, j: int) -> list[str]:
    out = list(items)
    out[i], out[j] = out[j], out[i]
    return out


def random_phrase(rng: random.Random, n_min: int, n_max: int) -> list[str]:
    """Distinct words: half the time a natural pattern, otherwise random vocabulary words."""
    n = rng.randint(n_min, n_max)
    if rng.random() >= 0.5:
        return rng.sample(VOCAB, n)
    pattern = [rng.choice(COLOURS + ADJECTIVES), rng.choice(ANIMALS), rng.choice(VERBS)]
    pattern += rng.sample([w for w in NOUNS if w not in pattern], 3)
    return pattern[:n]


def make(
    rng: random.Random,
    task: str,
    payload: str,
    prompts: list[str],
    instructions: list[str],
    answer: str,
    wrong: str,
) -> Problem:
    assert wrong != answer, (task, payload)
    prompt = rng.choice(prompts).format(x=payload)
    return Problem(task, payload, prompt, rng.choice(instructions), answer, wrong)


# ----------------------------------------------------------------------------- tasks


def gen_reverse(rng: random.Random) -> Problem:
    words = rng.sample(VOCAB, rng.randint(2, 3))
    answer = words[::-1]
    i = rng.randrange(len(answer) - 1)
    prompts = [
        "Reverse the words: {x}",
        "Reverse the order of these words: {x}",
        "Say these words backwards: {x}",
    ]
    instructions = [
        "Reverse the words.",
        "Reverse the order of the words.",
        "Write the words in reverse order.",
    ]
    wrong = " ".join(swap(answer, i, i + 1))
    return make(rng, "reverse", " ".join(words), prompts, instructions, " ".join(answer), wrong)


def gen_sort(rng: random.Random) -> Problem:
    nums = rng.sample(range(50), rng.randint(2, 3))
    answer = [str(n) for n in sorted(nums)]
    i, j = sorted(rng.sample(range(len(answer)), 2))
    prompts = [
        "Sort these numbers: {x}",
        "Sort from smallest to largest: {x}",
        "Put these numbers in ascending order: {x}",
    ]
    instructions = [
        "Sort the numbers.",
        "Sort the numbers in ascending order.",
        "Order the numbers from smallest to largest.",
    ]
    payload = " ".join(str(n) for n in nums)
    wrong = " ".join(swap(answer, i, j))
    return make(rng, "sort", payload, prompts, instructions, " ".join(answer), wrong)


def off_by(rng: random.Random, value: int) -> int:
    """A nearby wrong number (1-10 away, never negative)."""
    delta = rng.randint(1, 10)
    return value + delta if value - delta < 0 or rng.random() < 0.5 else value - delta


def gen_add(rng: random.Random) -> Problem:
    a, b = rng.randint(0, 69), rng.randint(0, 69)
    prompts = [f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute {a} plus {b}."]
    instructions = ["Add the numbers.", "Compute the sum.", "What is the sum?"]
    total = a + b
    return make(
        rng, "add", f"{a} + {b}", prompts, instructions, str(total), str(off_by(rng, total))
    )


def gen_upper(rng: random.Random) -> Problem:
    words = random_phrase(rng, 1, 3)
    i = rng.randrange(len(words))
    wrong = " ".join(w if k == i else w.upper() for k, w in enumerate(words))
    prompts = [
        "Uppercase: {x}",
        "Write this in capital letters: {x}",
        "Make it uppercase: {x}",
    ]
    instructions = [
        "Convert to uppercase.",
        "Write the text in capital letters.",
        "Uppercase the text.",
    ]
    phrase = " ".join(words)
    return make(rng, "upper", phrase, prompts, instructions, phrase.upper(), wrong)


def gen_first(rng: random.Random) -> Problem:
    words = random_phrase(rng, 2, 4)
    prompts = [
        "What is the first word: {x}",
        "Give the first word of: {x}",
        "Which word comes first: {x}",
    ]
    instructions = ["Give the first word.", "Return the first word.", "What is the first word?"]
    wrong = rng.choice([words[1], words[-1]])
    return make(rng, "first", " ".join(words), prompts, instructions, words[0], wrong)


def gen_last(rng: random.Random) -> Problem:
    words = random_phrase(rng, 2, 4)
    prompts = [
        "What is the last word: {x}",
        "Give the last word of: {x}",
        "Which word comes last: {x}",
    ]
    instructions = ["Give the last word.", "Return the last word.", "What is the last word?"]
    wrong = rng.choice([words[0], words[-2]])
    return make(rng, "last", " ".join(words), prompts, instructions, words[-1], wrong)


def gen_count(rng: random.Random) -> Problem:
    words = random_phrase(rng, 2, 4)
    n = len(words)
    prompts = ["How many words: {x}", "Count the words: {x}", "How many words are in: {x}"]
    instructions = ["Count the words.", "How many words are there?", "Give the number of words."]
    wrong = str(n + rng.choice([-1, 1]))
    return make(rng, "count", " ".join(words), prompts, instructions, str(n), wrong)


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "reverse": gen_reverse,
    "sort": gen_sort,
    "add": gen_add,
    "upper": gen_upper,
    "first": gen_first,
    "last": gen_last,
    "count": gen_count,
}


class Sampler:
    """Draws problems that are new to this file and not in ``banned`` (the validation set)."""

    def __init__(self, rng: random.Random, banned: set[str]) -> None:
        self.rng = rng
        self.banned = banned
        self.seen: set[str] = set()

    def draw(self, task: str) -> Problem:
        if task == "words":
            task = self.rng.choice(WORD_TASKS)
        for _ in range(10_000):
            problem = GENERATORS[task](self.rng)
            if problem.key not in self.banned and problem.key not in self.seen:
                self.seen.add(problem.key)
                return problem
        raise RuntimeError(f"could not draw a new {task!r} problem")


# ----------------------------------------------------------------------------- chats


def follow_up(rng: random.Random, sampler: Sampler) -> tuple[Problem, str, str, str]:
    """A first problem, then a second user turn with its answer and a wrong answer."""
    kind = rng.choice(FOLLOW_UPS)
    if kind == "add_more":
        first = sampler.draw("add")
        k = rng.randint(1, 20)
        text = rng.choice([f"Now add {k} to that.", f"Add {k} to the result.", f"And plus {k}?"])
        total = int(first.answer) + k
        wrong = first.answer if rng.random() < 0.3 else str(off_by(rng, total))
        return first, text, str(total), wrong
    if kind == "reverse_upper":
        first = sampler.draw("reverse")
        text = rng.choice(
            ["Now uppercase it.", "Make that uppercase.", "Now write it in capital letters."]
        )
        words = first.answer.split()
        i = rng.randrange(len(words))
        wrong = " ".join(w if k == i else w.upper() for k, w in enumerate(words))
        return first, text, first.answer.upper(), wrong
    first = sampler.draw("first")
    words = first.payload.split()
    text = rng.choice(
        ["And the last word?", "Now give the last word.", "What about the last word?"]
    )
    return first, text, words[-1], rng.choice([words[0], words[-2]])


def pick_system(rng: random.Random, has_letters: bool) -> tuple[str | None, bool]:
    """Maybe a system prompt; the flag says whether it asks for uppercase answers."""
    if rng.random() >= SYSTEM_RATE:
        return None, False
    if has_letters and rng.random() < 0.5:
        return rng.choice(UPPER_SYSTEMS), True
    return rng.choice(NEUTRAL_SYSTEMS), False


def upper_wrong(rng: random.Random, answer: str, wrong: str) -> str:
    """Wrong answer under an uppercase system prompt: ignore the prompt, or be wrong."""
    return answer if rng.random() < 0.5 else wrong.upper()


def build_conversation(rng: random.Random, sampler: Sampler, task: str) -> Conversation:
    turns: list[tuple[str, str]] = []
    if task == "multi":
        first, text, answer, wrong = follow_up(rng, sampler)
        turns = [(first.prompt, first.answer), (text, answer)]
    else:
        problem = sampler.draw(task)
        turns, wrong = [(problem.prompt, problem.answer)], problem.wrong
    final = turns[-1][1]
    letters = any(c.isalpha() for c in final) and final != final.upper()
    system, upper = pick_system(rng, letters)
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant.upper() if upper else assistant})
    if upper:
        wrong = upper_wrong(rng, final, wrong)
    return Conversation(messages, wrong)


def task_cycle(rng: random.Random, tasks: list[str], n: int) -> list[str]:
    """Exactly equal shares (up to rounding), in a random order."""
    order = [tasks[i % len(tasks)] for i in range(n)]
    rng.shuffle(order)
    return order


def sft_rows(rng: random.Random, sampler: Sampler, n: int) -> Iterator[dict]:
    for task in task_cycle(rng, CHAT_TASKS, n):
        yield {"messages": build_conversation(rng, sampler, task).messages}


def preference_rows(rng: random.Random, sampler: Sampler, n: int) -> Iterator[dict]:
    for task in task_cycle(rng, CHAT_TASKS, n):
        conv = build_conversation(rng, sampler, task)
        yield {
            "prompt": conv.messages[:-1],
            "chosen": [conv.messages[-1]],
            "rejected": [{"role": "assistant", "content": conv.wrong}],
        }


def unpaired_rows(pairs: list[dict]) -> Iterator[dict]:
    for pair in pairs:
        for side, label in (("chosen", True), ("rejected", False)):
            yield {"prompt": pair["prompt"], "completion": pair[side], "label": label}


def alpaca_rows(rng: random.Random, sampler: Sampler, n: int) -> Iterator[dict]:
    for task in task_cycle(rng, SINGLE_TASKS, n):
        problem = sampler.draw(task)
        if rng.random() < ALPACA_SELF_CONTAINED_RATE:
            row = {"instruction": problem.prompt, "input": "", "output": problem.answer}
        else:
            row = {"instruction": problem.instruction, "input": problem.payload}
            row["output"] = problem.answer
        letters = problem.answer != problem.answer.upper()
        system, upper = pick_system(rng, letters)
        if upper:
            row["output"] = problem.answer.upper()
        if system:
            row["system"] = system
        yield row


# ----------------------------------------------------------------------------- pretraining


def sentence(rng: random.Random) -> str:
    animal, fruit, nature = rng.choice(ANIMALS), rng.choice(FRUITS), rng.choice(NATURE)
    colour, adj, verb = rng.choice(COLOURS), rng.choice(ADJECTIVES), rng.choice(VERBS)
    obj, obj2 = rng.sample(OBJECTS, 2)
    n = rng.randint(0, 98)
    m = rng.randint(0, 99)
    word = rng.choice(VOCAB)
    templates = [
        f"the {colour} {animal} {verb}.",
        f"the {adj} {animal} {verb} near the {nature}.",
        f"{article(animal)} {animal} eats {article(fruit)} {fruit}.",
        f"{article(fruit)} {fruit} is {FRUIT_COLOUR[fruit]}.",
        f"the {animal} lives in the {ANIMAL_HOME[animal]}.",
        f"the {obj} is on the {obj2}.",
        f"the {animal} likes the {colour} {obj}.",
        f"{n} plus {m} is {n + m}.",
        f"{n + 1} comes after {n}.",
        f"{word} in capital letters is {word.upper()}.",
    ]
    return rng.choice(templates)


def qa_line(sampler: Sampler) -> str:
    problem = sampler.draw(sampler.rng.choice(SINGLE_TASKS))
    return f"Q: {problem.prompt}\nA: {problem.answer}"


def pretrain_doc(rng: random.Random, sampler: Sampler) -> str:
    """Prose, worked examples or both; roughly log-uniform length of 20 to 200 words."""
    target = min(170, int(20 * 10 ** rng.random()))  # a block adds at most ~30 words
    style = rng.choice(["prose", "examples", "mixed"])
    header = rng.choice(["Examples:", "Here are some worked examples.", "Questions and answers."])
    blocks: list[str] = [header] if style == "examples" else []
    words = len(header.split()) if blocks else 0
    while words < target:
        if style == "prose" or (style == "mixed" and rng.random() < 0.6):
            block = " ".join(sentence(rng) for _ in range(rng.randint(2, 4)))
        else:
            block = qa_line(sampler)
        blocks.append(block)
        words += len(block.split())
    return "\n".join(blocks) if style != "prose" else " ".join(blocks)


def pretrain_rows(rng: random.Random, sampler: Sampler, n: int) -> Iterator[dict]:
    for _ in range(n):
        yield {"text": pretrain_doc(rng, sampler)}


# ----------------------------------------------------------------------------- main

BUILDERS: dict[str, Callable[[random.Random, Sampler, int], Iterator[dict]]] = {
    "sft": sft_rows,
    "alpaca": alpaca_rows,
    "pretrain": pretrain_rows,
    "preference": preference_rows,
}


# answers a program checks exactly; sorting is left out: the SFT demo's model never sorts
# right, even in 16 samples, so its groups would carry no signal
GRPO_TASKS = ["add", "count", "first", "last", "reverse", "upper"]


def grpo_rows(rng: random.Random, sampler: Sampler, n: int) -> Iterator[dict]:
    for task in task_cycle(rng, GRPO_TASKS, n):
        problem = sampler.draw(task)
        prompt = [{"role": "user", "content": problem.prompt}]
        yield {"prompt": prompt, "answer": problem.answer, "task": task}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path.name:<26} rows={len(rows):>5}  bytes={path.stat().st_size:>9,}")


def build_split(
    name: str, split: str, n: int, seed: int, banned: set[str]
) -> tuple[list[dict], set[str]]:
    rng = random.Random(f"{seed}:{name}:{split}")
    sampler = Sampler(rng, banned)
    rows = list(BUILDERS[name](rng, sampler, n))
    return rows, sampler.seen


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "demo")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--n-train", type=int, default=8000, help="SFT train rows")
    parser.add_argument("--n-val", type=int, default=200, help="SFT val rows")
    parser.add_argument(
        "--other-fraction",
        type=float,
        default=0.5,
        help="rows of alpaca / pretrain / preference files, as a fraction of the SFT counts",
    )
    parser.add_argument("--n-grpo-train", type=int, default=2000, help="GRPO train prompts")
    parser.add_argument("--n-grpo-val", type=int, default=240, help="GRPO val prompts")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": args.n_train, "val": args.n_val}
    splits: dict[tuple[str, str], list[dict]] = {}
    val_keys: set[str] = set()
    for name in BUILDERS:  # validation first: its problems are banned from every train file
        n = sizes["val"] if name == "sft" else round(sizes["val"] * args.other_fraction)
        splits[name, "val"], seen = build_split(name, "val", n, args.seed, set())
        val_keys |= seen
    used = set(val_keys)  # GRPO's prompts are new to every validation file and to SFT
    for name in BUILDERS:
        n = sizes["train"] if name == "sft" else round(sizes["train"] * args.other_fraction)
        splits[name, "train"], seen = build_split(name, "train", n, args.seed, val_keys)
        used |= seen if name == "sft" else set()
    # drawn last, so the other files stay as they were
    rng = random.Random(f"{args.seed}:grpo")
    sampler = Sampler(rng, used)
    for split, n in (("val", args.n_grpo_val), ("train", args.n_grpo_train)):
        splits["grpo", split] = list(grpo_rows(rng, sampler, n))
    for split in ("train", "val"):
        splits["kto", split] = list(unpaired_rows(splits["preference", split]))
    total = 0
    for (name, split), rows in sorted(
        splits.items(), key=lambda kv: (kv[0][0], kv[0][1] != "train")
    ):
        path = args.out / f"{name}_{split}.jsonl"
        write_jsonl(path, rows)
        total += path.stat().st_size
    print(f"{'total':<26} files={len(splits):>4}  bytes={total:>9,}")


if __name__ == "__main__":
    main()
