"""Writes words.jsonl: four kinds of one-word-answer problems as chat rows, the data of the
README's "Train on your own data" walkthrough. ``python make_words.py`` reproduces the file."""

import json
import random

WORDS = (
    "ant bat bee cat cow crab crow deer dog duck eel elk fish fly fox frog goat hare hawk hen "
    "lamb lark lion mole moth mouse mule newt owl ox pig pony ram rat seal slug swan toad wolf yak"
).split()
SYSTEM = "Answer with one word."


def problem(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind in ("first", "last"):
        words = rng.sample(WORDS, 3)
        return f"Which word comes {kind}? {' '.join(words)}", words[0 if kind == "first" else -1]
    digits = rng.sample(range(10), 3)
    pick = max(digits) if kind == "largest" else min(digits)
    return f"Which is {kind}? {' '.join(map(str, digits))}", str(pick)


def main(path: str = "words.jsonl", per_kind: int = 600, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows, seen = [], set()
    for kind in ("first", "last", "largest", "smallest"):
        count = 0
        while count < per_kind:
            prompt, answer = problem(kind, rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            count += 1
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
            rows.append({"messages": messages, "answer": answer, "kind": kind})
    rng.shuffle(rows)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
