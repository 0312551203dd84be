"""The bundled pretraining corpus: synthetic, seeded, and salted with junk for the cleaners.

    python -m rlhf.data.pretrain_corpus rlhf/data/samples/pretrain     # regenerate the files

Three sources of original templated text: `web` (everyday prose and many arithmetic statements,
which prepare the tiny model for the demo addition task), `code` (small generated Python
functions) and `papers` (abstract-like paragraphs). About 8% of each source is junk that the
filters must catch: exact copies, near copies with one word changed, symbol-heavy boilerplate,
too-short fragments and repeated-line spam.

No sum in it uses an operand pair held out by the demo task (`rlhf.data.addition.split`): the
held-out evaluation measures what the model works out, not what it read during pretraining.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from rlhf.data.addition import split

HELD_OUT_PAIRS = frozenset(split()[1])

NAMES = ["Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon"]
PLACES = ["the market", "the library", "the park", "the station", "a small cafe", "the harbour"]
THINGS = ["apples", "books", "tickets", "stamps", "marbles", "pencils", "shells", "coins"]
TOPICS = [
    "gardening",
    "cycling",
    "baking bread",
    "learning a language",
    "saving money",
    "walking in the hills",
    "repairing a bicycle",
    "keeping bees",
]
FIELDS = [
    "sparse attention",
    "reward modelling",
    "curriculum learning",
    "weight decay",
    "data deduplication",
    "policy gradients",
    "tokenization",
    "model distillation",
]


def _pair(
    rng: random.Random, a_range: tuple[int, int], b_range: tuple[int, int]
) -> tuple[int, int]:
    """Operands drawn from the ranges, never a pair held out by the demo task."""
    while True:
        a, b = rng.randint(*a_range), rng.randint(*b_range)
        if (a, b) not in HELD_OUT_PAIRS:
            return a, b


def _arith(rng: random.Random) -> str:
    a, b = _pair(rng, (0, 99), (0, 99))
    return rng.choice(
        [
            f"{a} plus {b} equals {a + b}.",
            f"What is {a}+{b}? {a + b}.",
            f"{a}+{b}={a + b}.",
            f"If you add {a} and {b} you get {a + b}.",
            f"The sum of {a} and {b} is {a + b}.",
        ]
    )


def web_doc(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    n, m = _pair(rng, (2, 60), (2, 39))
    thing, topic = rng.choice(THINGS), rng.choice(TOPICS)
    sentences = [
        f"{name} went to {rng.choice(PLACES)} on a {rng.choice(['sunny', 'rainy', 'quiet'])} "
        f"morning and bought {n} {thing}.",
        f"Later {other} gave {name} {m} more, so {name} had {n + m} {thing} in total.",
        f"{name} has been interested in {topic} for {rng.randint(2, 12)} years.",
        f"Most weekends {name} spends a few hours on {topic} with {other}.",
        _arith(rng),
        _arith(rng),
        _arith(rng),
        f'"It is easier than it looks," said {other}, "if you practise every day."',
    ]
    rng.shuffle(sentences)
    return " ".join(sentences[: rng.randint(4, len(sentences))])


def code_doc(rng: random.Random) -> str:
    fn = rng.choice(["total", "scale", "clip", "mean_of", "count_if", "add_pair"])
    a, b = _pair(rng, (1, 9), (10, 99))
    bodies = {
        "total": "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n",
        "scale": f"def scale(xs, k={a}):\n    return [x * k for x in xs]\n",
        "clip": f"def clip(x, lo=0, hi={b}):\n    return max(lo, min(hi, x))\n",
        "mean_of": "def mean_of(xs):\n    if not xs:\n        return 0.0\n"
        "    return sum(xs) / len(xs)\n",
        "count_if": f"def count_if(xs, limit={b}):\n    return sum(1 for x in xs if x > limit)\n",
        "add_pair": f"def add_pair(a, b):\n    # {a} + {b} == {a + b}\n    return a + b\n",
    }
    test = f"\nassert add_pair({a}, {b}) == {a + b}\n" if fn == "add_pair" else ""
    return f"# helper number {rng.randint(1, 10**6)}\n" + bodies[fn] + test


def paper_doc(rng: random.Random) -> str:
    field, other, third = rng.sample(FIELDS, 3)
    gain, k, n = rng.randint(1, 30), rng.randint(3, 12), rng.choice([64, 128, 256, 512, 1024])
    pool = [
        f"We study {field} in small language models.",
        f"Prior work on {other} suggests that careful design matters more than scale.",
        f"We propose a method that combines {field} with {third} and evaluate it on {k} tasks.",
        f"Our results show a gain of {gain} percent over a strong baseline.",
        f"An ablation attributes most of the gain to {field}, not to {other}.",
        f"Training uses batches of {n} sequences and takes {rng.randint(2, 90)} hours.",
        f"Surprisingly, {third} hurts when the model has fewer than {k} layers.",
        f"We find that {other} and {field} interact in ways earlier analyses missed.",
        f"The method adds {rng.randint(1, 9)} lines of code and no new hyperparameters.",
        f"Errors fall from {gain + 20} to {gain} percent on held-out data.",
        f"We release code and data to support further work on {third}.",
        f"Limitations include the cost of {other} at sequence length {n * 4}.",
    ]
    rng.shuffle(pool)
    return " ".join(pool[: rng.randint(4, 7)])


def junk(rng: random.Random, docs: list[str]) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(docs)  # exact duplicate
    if kind == 1:  # near duplicate: one word changed
        words = rng.choice(docs).split(" ")
        words[rng.randrange(len(words))] = "indeed"
        return " ".join(words)
    if kind == 2:
        return "#### menu {{{ }}} ||| <<< home >>> " * rng.randint(5, 20)
    if kind == 3:
        return rng.choice(["Home", "Next page", "Subscribe now", "Share"])
    return "BUY NOW limited offer\n" * rng.randint(5, 12)


def build(seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    sizes = {"web": (web_doc, 5000), "code": (code_doc, 1500), "papers": (paper_doc, 1500)}
    out = {}
    for name, (make, n) in sizes.items():
        docs = [make(rng) for _ in range(n)]
        docs += [junk(rng, docs) for _ in range(n // 12)]
        rng.shuffle(docs)
        out[name] = docs
    return out


def write(folder: Path, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in build(seed).items():
        text = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "rlhf/data/samples/pretrain"))
