"""Scores from a built-in task's gold judge (1 if the answer is right, else 0)."""
from __future__ import annotations

import torch

from ..data.tasks import TASKS


def gold_reward(task: str):
    """(rows, completion texts[, completion ids]) -> (B,) scores: the task's judge against each row's answer."""
    judge = TASKS[task][1]

    def reward(rows: list[dict], texts: list[str], completion_ids=None) -> torch.Tensor:
        return torch.tensor([judge(t, r["answer"]) for r, t in zip(rows, texts)])

    return reward
