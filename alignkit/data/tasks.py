"""Built-in tasks: generated deterministically from a seed, each with a gold judge.

`arithmetic`: one-step word problems (add, subtract, multiply small numbers).
Rows are conversational (chat messages), so they go through the chat template.
"""
from __future__ import annotations

import random
import re

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade"]
THINGS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    """Return (question, worked answer sentence head, answer)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    op = rng.choice(["add", "sub", "mul"])
    if op == "add":
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        return q, f"{a} + {b} = ", a + b
    if op == "sub":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        return q, f"{a} - {b} = ", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} has {a} bags with {b} {thing} in each. How many {thing} is that in total?"
    return q, f"{a} * {b} = ", a * b


def _wrong(rng: random.Random, answer: int) -> int:
    wrong = answer + rng.choice([-10, -2, -1, 1, 2, 10])
    return wrong if wrong >= 0 and wrong != answer else answer + 1


def _reply(head: str, value: int) -> str:
    return f"{head}{value}. The answer is {value}."


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    """n rows with prompt/completion (SFT) and chosen/rejected (preference) columns."""
    rng = random.Random(f"arithmetic-{seed}")
    rows = []
    for _ in range(n):
        question, head, answer = _problem(rng)
        prompt = [{"role": "user", "content": question}]
        good = [{"role": "assistant", "content": _reply(head, answer)}]
        bad = [{"role": "assistant", "content": _reply(head, _wrong(rng, answer))}]
        rows.append({"prompt": prompt, "completion": good, "chosen": good, "rejected": bad, "answer": answer})
    return rows


def judge_arithmetic(completion: str, answer: int) -> float:
    """Gold judge: 1.0 if the last integer in the completion is the answer, else 0.0."""
    numbers = re.findall(r"-?\d+", completion)
    return float(bool(numbers) and int(numbers[-1]) == answer)


TASKS = {"arithmetic": (arithmetic_rows, judge_arithmetic)}
