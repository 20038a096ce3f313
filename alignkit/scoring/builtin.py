"""Built-in reward functions (reward=functions, by name), with TRL's signature:
fn(prompts=, completions=, completion_ids=, **row_columns) -> list[float | None].

For the arithmetic tasks (`arithmetic`, `arithmetic_format`): rows carry the right number in `answer`; a
completion is a string, or a one-message list for chat prompts.
"""
from __future__ import annotations

import re

from ..data.tasks import ANSWER_LINE, answer_line

ANSWER_WORD = re.compile(r"answer\D{0,12}-?\d", re.IGNORECASE)  # "answer" then a number soon after


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of a chat completion's messages."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion)
    return completion


def correct_answer(completions: list, answer: list | None = None, **_) -> list[float | None]:
    """1.0 when the last line is "Answer: N" with the row's answer N, else 0.0 (None for a row without one)."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if a is None else float(answer_line(completion_text(c)) == a) for c, a in zip(completions, answers)]


def format_credit(text: str) -> float:
    """1.0: the last line is "Answer: N"; 0.5: such a line, but not last; 0.25: "answer" and a number soon after
    ("The answer is 12"); else 0.0."""
    if answer_line(text) is not None:
        return 1.0
    if any(ANSWER_LINE.fullmatch(line.strip()) for line in text.splitlines()):
        return 0.5
    return 0.25 if ANSWER_WORD.search(text) else 0.0


def answer_format(completions: list, **_) -> list[float]:
    """The format alone, right number or wrong, with partial credit on the way to it (format_credit): a signal a
    small model finds in its samples long before it ends every reply with the answer line."""
    return [format_credit(completion_text(c)) for c in completions]


BUILTIN = {"correct_answer": correct_answer, "answer_format": answer_format}
