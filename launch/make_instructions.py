"""Write dist_lora/data/instructions.jsonl: the built-in instruction dataset (chat messages)
used by configs/sft_small.yaml. Small, deterministic tasks a tiny byte-level model can learn:
arithmetic, spelling backwards, upper case, counting letters. Run: python launch/make_instructions.py"""

import json
import random
from pathlib import Path

WORDS = "apple river stone cloud tiger music paper green light honey maple ocean pixel robot sugar table".split()
SYSTEM = {"role": "system", "content": "Answer in one short sentence."}


def task(rng: random.Random) -> tuple[str, str]:
    kind, word = rng.randrange(4), rng.choice(WORDS)
    if kind == 0:
        a, b = rng.randrange(20), rng.randrange(20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        return f"Spell {word} backwards.", f"{word} backwards is {word[::-1]}."
    if kind == 2:
        return f"Write {word} in capitals.", f"{word} in capitals is {word.upper()}."
    return f"How many letters are in {word}?", f"{word} has {len(word)} letters."


def conversation(rng: random.Random) -> dict:
    messages = [SYSTEM] if rng.random() < 0.3 else []
    for _ in range(1 + (rng.random() < 0.25)):
        question, answer = task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


if __name__ == "__main__":
    rng = random.Random(0)
    out = Path(__file__).resolve().parents[1] / "dist_lora" / "data" / "instructions.jsonl"
    out.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(600)))
    print(f"wrote {out}")
