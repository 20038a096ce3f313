"""Right-padded batches with explicit attention and completion masks."""
from __future__ import annotations

import torch

from .packing import pack


def pad_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    comp = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        attn[i, :n] = 1
        comp[i, :n] = torch.tensor(e["completion_mask"])
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def collate_sft(examples: list[dict], pad_id: int, packed: bool = False) -> dict:
    """Padded rows; with packed=True also the padding-free layout (data/packing.py) under "packed"."""
    batch = pad_batch(examples, pad_id)
    if packed:
        batch["packed"] = pack([[e] for e in examples], pad_id)
    batch["count"] = int(batch["completion_mask"][:, 1:].sum())  # tokens the loss averages over
    batch["samples"] = len(examples)
    return batch


def collate_preference(examples: list[dict], pad_id: int, packed: bool = False) -> dict:
    """Chosen rows then rejected rows (2B rows), so one forward pass serves both; with packed=True also
    the padding-free layout with each prompt once (data/packing.py) under "packed"."""
    batch = pad_batch([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)
    if packed:
        batch["packed"] = pack([[e["chosen"], e["rejected"]] for e in examples], pad_id)
    batch["count"] = batch["samples"] = len(examples)  # pairs the loss averages over
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([e["margin"] for e in examples])
    if "ref_chosen" in examples[0]:
        batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples])
        batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples])
    return batch


def to_device(batch: dict, device) -> dict:
    """Every tensor of a batch (and of nested dicts: the packed layout) on `device`."""
    return {k: v.to(device) if torch.is_tensor(v) else to_device(v, device) if isinstance(v, dict) else v
            for k, v in batch.items()}
