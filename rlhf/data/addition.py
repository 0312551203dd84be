"""The bundled demo task: integer addition with operands 0..99, in every shipped data format.

    python -m rlhf.data.addition rlhf/data/samples      # regenerate the sample files

A question is `What is 23+45?` and the answer exactly `68`. The 10,000 (a, b) questions are
shuffled once with the seed; the first 400 are held out (evaluation files) and never appear in a
training file. Wrong answers for preference data are near misses (off by 1 or 10, digits swapped).
The demonstrations ask 6,800 of the 9,600 training questions (2,000 of them until 2026-12-04:
whether the demo's 0.9M model then learned the units digit of held-out sums within its 1,200
SFT steps depended on the seed and on float rounding; see the README). The RL prompts are every
training question once.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HELD_OUT = 400


def question(a: int, b: int) -> str:
    return f"What is {a}+{b}?"


def near_misses(a: int, b: int, rng: random.Random) -> list[str]:
    """Distinct wrong answers close to a + b, nearest first."""
    s = a + b
    cands = [s + 1, s - 1, s + 10, s - 10, int(str(s)[::-1]) if s > 9 else s + 2, s + 2]
    out: list[str] = []
    for c in cands:
        if c >= 0 and c != s and str(c) not in out:
            out.append(str(c))
    if rng.random() < 0.5:  # +1 and -1 equally often
        out[0], out[1] = out[1], out[0]
    return out


def split(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(pairs)
    return pairs[HELD_OUT:], pairs[:HELD_OUT]


def build(seed: int = 0) -> dict[str, list[dict]]:
    train, held = split(seed)
    rng = random.Random(seed + 1)
    take = iter(train * 3)
    files: dict[str, list[dict]] = {}
    first = [next(take) for _ in range(2000)]
    files["sft_instruction"] = [
        {
            "instruction": "Add the two numbers and answer with the sum only.",
            "input": f"{a}+{b}",
            "output": str(a + b),
        }
        for a, b in (next(take) for _ in range(200))
    ]
    chats = []
    for _ in range(300):
        (a, b), (c, d) = next(take), next(take)
        turns = (
            [{"role": "system", "content": "You answer with a number."}]
            if rng.random() < 0.5
            else []
        )
        turns += [
            {"role": "user", "content": question(a, b)},
            {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": question(c, d)},
            {"role": "assistant", "content": str(c + d)},
        ]
        chats.append({"messages": turns})
    files["sft_messages"] = chats
    # 4,000 more demonstrations: the questions after the chats' (the preference files below ask
    # 2,300 of them as well).
    asked = len(first) + len(files["sft_instruction"]) + 2 * len(chats)
    files["sft_io"] = [
        {"input": question(a, b), "output": str(a + b)}
        for a, b in first + train[asked : asked + 4000]
    ]
    files["sft_eval"] = [{"input": question(a, b), "output": str(a + b)} for a, b in held[:200]]
    # Any near miss, not only the nearest: an off-by-one answer differs in the units digit, an
    # off-by-ten one in the tens digit, and a reward model should learn both kinds of error.
    files["pairwise"] = [
        {
            "prompt": question(a, b),
            "chosen": str(a + b),
            "rejected": rng.choice(near_misses(a, b, rng)),
        }
        for a, b in (next(take) for _ in range(2000))
    ]
    files["pairwise_eval"] = [
        {
            "prompt": question(a, b),
            "chosen": str(a + b),
            "rejected": rng.choice(near_misses(a, b, rng)),
        }
        for a, b in held[:200]
    ]
    files["ranked"] = [
        {
            "prompt": question(a, b),
            "responses": rng.sample(
                [
                    {"text": t, "rank": r + 1}
                    for r, t in enumerate([str(a + b), *near_misses(a, b, rng)[:2]])
                ],
                3,
            ),
        }
        for a, b in (next(take) for _ in range(300))
    ]
    files["prompts"] = [{"prompt": question(a, b), "label": str(a + b)} for a, b in train]
    files["prompts_eval"] = [
        {"prompt": question(a, b), "label": str(a + b)} for a, b in held[200:400]
    ]
    return files


def write(folder: Path, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in build(seed).items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "rlhf/data/samples"))
