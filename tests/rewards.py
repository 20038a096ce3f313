"""Reward functions the tests name in reward.functions (TRL's signature)."""


def letters(completions, **_):
    """The share of ASCII letters in each completion: varies on a random tiny model's byte soup."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.isascii() and ch.isalpha() for ch in t) / max(len(t), 1) for t in texts]


def letter_count(completions, **_):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(sum(ch.isascii() and ch.isalpha() for ch in t)) for t in texts]


def none_for_odd(completions, **_):
    return [None if i % 2 else 1.0 for i in range(len(completions))]


def wrong_length(completions, **_):
    return [0.0] * (len(completions) + 1)


def raises(completions, **_):
    raise KeyError("no such column")


def nan(completions, **_):
    return [float("nan")] * len(completions)


def sees_columns(prompts, completions, completion_ids, answer, **kwargs):
    """1.0 when it gets TRL's keywords: a prompt and an id list per completion, and the rows' other columns."""
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer)
    assert all(isinstance(ids, list) and ids for ids in completion_ids) and "chosen" in kwargs
    return [1.0] * len(completions)


def text_length(completions, **_):
    """Characters in each completion (varies within grpo_fixed.py's groups, whose texts are digits and signs)."""
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]
