"""Padding-free batches: several sequences per row, and one prompt shared by its chosen and rejected answers.

A pair is laid out once as prompt | chosen | rejected. The rejected tokens see the prompt and each other but
not the chosen ones (a 4-D attention mask), and their position ids restart where the prompt ends, so each
answer gets exactly the log-probs of its own prompt+answer sequence while the prompt is computed once. Units
(pairs, or single SFT sequences) are then packed first-fit-decreasing into rows as wide as the longest unit,
so a batch carries almost no padding. The targets are listed flat: for every counted token, the flat position
that predicts it, its id and the sequence it belongs to.
"""
from __future__ import annotations

import torch


def shared_prefix(first: dict, other: dict) -> int:
    """Tokens `other` can share with `first`: their common leading prompt (never a counted token)."""
    n = 0
    for a, b, ca, cb in zip(first["input_ids"], other["input_ids"], first["completion_mask"],
                            other["completion_mask"]):
        if a != b or ca or cb:
            break
        n += 1
    return n


def unit_places(sequences: list[dict]) -> tuple[list[int], list[list[int]]]:
    """Lay out one unit: its token ids, and for each sequence the local places of its tokens."""
    ids = list(sequences[0]["input_ids"])
    places = [list(range(len(ids)))]
    for seq in sequences[1:]:
        share = shared_prefix(sequences[0], seq)
        start = len(ids)
        ids += seq["input_ids"][share:]
        places.append(list(range(share)) + list(range(start, len(ids))))
    return ids, places


def first_fit(lengths: list[int]) -> tuple[list[tuple[int, int]], int, int]:
    """First-fit decreasing into rows as wide as the longest unit: ((row, offset) per unit, rows, width)."""
    width = max(lengths)
    fill: list[int] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= width), len(fill))
        if row == len(fill):
            fill.append(0)
        where[i] = (row, fill[row])
        fill[row] += lengths[i]
    return where, len(fill), width


def pack(units: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """units: lists of sequences ({input_ids, completion_mask}); sequences are numbered in the order
    (unit 0 seq 0, unit 1 seq 0, ..., unit 0 seq 1, ...), i.e. all first sequences (chosen) then all second
    (rejected), as the padded preference batch orders its rows.

    Returns input_ids / position_ids (R, L), mask (R, 1, L, L) bool (True = may attend), pred / target /
    owner (N,) for the N counted tokens, and tokens (S,) counted per sequence."""
    laid = [unit_places(seqs) for seqs in units]
    where, rows, width = first_fit([len(ids) for ids, _ in laid])
    ids_t = torch.full((rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)  # padding sees itself: no empty softmax row
    n_seq = len(units[0])
    pred, target, owner = [], [], []
    tokens = torch.zeros(n_seq * len(units), dtype=torch.long)
    for u, ((ids, places), (row, off)) in enumerate(zip(laid, where)):
        ids_t[row, off:off + len(ids)] = torch.tensor(ids)
        for k, (seq, local) in enumerate(zip(units[u], places)):
            at = torch.tensor(local) + off
            pos[row, at] = torch.arange(len(local))
            mask[row, at.unsqueeze(1), at.unsqueeze(0)] = torch.ones(len(at), len(at), dtype=torch.bool).tril()
            counted = torch.tensor(seq["completion_mask"][1:], dtype=torch.bool)
            s = k * len(units) + u
            pred.append(row * width + at[:-1][counted])
            target.append(torch.tensor(seq["input_ids"][1:])[counted])
            owner.append(torch.full((int(counted.sum()),), s, dtype=torch.long))
            tokens[s] = int(counted.sum())
    return {"input_ids": ids_t, "position_ids": pos, "mask": mask.unsqueeze(1), "pred": torch.cat(pred),
            "target": torch.cat(target), "owner": torch.cat(owner), "tokens": tokens}
