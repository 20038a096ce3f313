"""Example reward functions for `reward=functions` (method=grpo or rloo), written as TRL writes them.

    alignkit train method=grpo data=arithmetic_format reward=functions \
        "reward.functions=[examples/reward_functions.py:reasoning_then_answer,correct_answer]" "reward.weights=[0.5,1.0]"

alignkit calls each function once per step with keyword arguments, as TRL's GRPOTrainer does:

    prompts         the prompts, one per completion (a prompt repeats for its G completions); strings, or lists
                    of chat messages for chat data
    completions     the sampled texts: strings, or for chat prompts one-message lists
                    [{"role": "assistant", "content": "..."}]
    completion_ids  the sampled token ids, one list per completion
    **columns       every other column of the data rows, one value per completion (here `answer`)

and it returns one float per completion, or None for a completion it does not score (the other functions'
weighted sum still counts for it). Raising, returning the wrong number of values or NaN stops the run with one
line naming the function. Accept **kwargs so that columns you do not use do not matter.
"""
from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def text_of(completion) -> str:
    """A completion's text, whether the data is plain text or chat."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def reasoning_then_answer(completions, **kwargs) -> list[float]:
    """1.0 when a computation ("a + b = c") comes before the final "Answer: N" line, else 0.0."""
    out = []
    for c in completions:
        lines = [x.strip() for x in text_of(c).strip().splitlines() if x.strip()]
        worked = any("=" in x for x in lines[:-1])
        out.append(float(bool(lines) and lines[-1].lower().startswith("answer:") and worked))
    return out


def close_answer(completions, answer=None, **kwargs) -> list[float | None]:
    """Partial credit for a near miss: 1 / (1 + |last number - answer|); None for rows without an answer column
    (then only the other functions score them) and 0.0 for a completion without a number."""
    answers = answer if answer is not None else [None] * len(completions)
    out = []
    for c, a in zip(completions, answers):
        numbers = NUMBER.findall(text_of(c))
        out.append(None if a is None else (1.0 / (1.0 + abs(int(numbers[-1]) - a)) if numbers else 0.0))
    return out


def brevity(completions, completion_ids, **kwargs) -> list[float]:
    """Shorter is better: 1 - tokens / 64, floored at 0 (uses the token ids, not the text)."""
    return [max(0.0, 1.0 - len(ids) / 64) for ids in completion_ids]
