"""Built-in reward functions (reward=functions, by name), with TRL's signature:
fn(prompts=, completions=, completion_ids=, **row_columns) -> list[float | None].

For the arithmetic tasks (`arithmetic`, `arithmetic_format`): rows carry the right number in `answer`; a
completion is a string, or a one-message list for chat prompts.
"""
from __future__ import annotations

from ..data.tasks import answer_line


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of a chat completion's messages."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion)
    return completion


def correct_answer(completions: list, answer: list | None = None, **_) -> list[float | None]:
    """1.0 when the last line is "Answer: N" with the row's answer N, else 0.0 (None for a row without one)."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if a is None else float(answer_line(completion_text(c)) == a) for c, a in zip(completions, answers)]


def answer_format(completions: list, **_) -> list[float]:
    """1.0 when the last line is "Answer: N" for some integer N, else 0.0: the format alone, right or wrong."""
    return [float(answer_line(completion_text(c)) is not None) for c in completions]


BUILTIN = {"correct_answer": correct_answer, "answer_format": answer_format}
