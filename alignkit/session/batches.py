"""Which rows each step trains on: a seeded order per epoch, cut into micro-batches; the data position is a
function of the step, so a resumed run (or another process count) continues exactly where a step says."""
from __future__ import annotations

import math
import random

import torch

from . import dist


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def micro_batches(examples: list, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list]:
    """The epoch's examples in a seeded order (or in order), cut into micro-batches."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(examples), generator=g).tolist() if shuffle else list(range(len(examples)))
    return [[examples[i] for i in order[j:j + batch_size]] for j in range(0, len(order), batch_size)]


def plan_steps(n_examples: int, train, world: int = 1, accumulate: bool = True) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps); a step takes batch_size x world x grad_accum rows
    (online methods: batch_size x world prompts, accumulate=False)."""
    accum = train.grad_accum if accumulate else 1
    per_epoch = math.ceil(math.ceil(n_examples / (train.batch_size * world)) / accum)
    total = train.max_steps if train.max_steps > 0 else per_epoch * train.epochs
    return per_epoch, total


def step_windows(examples, train, per_epoch: int, start: int, total: int, accum: int, rank: int = 0,
                 world: int = 1):
    """Yield (step, epoch, micro-batches of that step) from `start` on; data position = f(step).

    A micro-batch is this process's (rows, real rows) share of a global one of batch_size x world rows;
    a step has `accum` of them.
    """
    cached_epoch, batches = None, None
    for step in range(start, total):
        epoch = step // per_epoch
        if epoch != cached_epoch:
            cached_epoch, batches = epoch, micro_batches(examples, train.batch_size * world, train.seed, epoch,
                                                         train.shuffle)
        i = (step % per_epoch) * accum
        yield step, epoch, [dist.share(b, rank, world) for b in batches[i:i + accum]]


def model_input_batches(examples: list, collate, pad_id: int, train) -> list[dict]:
    """The training rows in epoch 0's order as plain model inputs ({input_ids, attention_mask} micro-batches of
    train.batch_size), the same on every process: for an adapter init that learns from data (LoRA's init=eva).
    collate None (online methods): the rows are prompts (prompt_ids), left-padded."""
    from ..generation.sample import left_pad

    batches = []
    for rows in micro_batches(examples, train.batch_size, train.seed, 0, train.shuffle):
        if collate is None:
            ids, attn = left_pad([r["prompt_ids"] for r in rows], pad_id, "cpu")
        else:
            batch = collate(rows)
            ids, attn = batch["input_ids"], batch["attention_mask"]
        batches.append({"input_ids": ids, "attention_mask": attn})
    return batches
