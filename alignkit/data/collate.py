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


def mismatched(examples: list[dict], max_length: int) -> list[dict]:
    """Each row's prompt with another row's completion, cut to max_length: its fixed partner's
    (`kl_completion_ids`, set before a precomputed reference pass) or, by default, the completion of the row
    before it in the batch (the first row takes the last one's), as TRL's KTOTrainer shifts them."""
    out = []
    for i, e in enumerate(examples):
        prompt = e["input_ids"][:len(e["completion_mask"]) - sum(e["completion_mask"])]
        other = e["kl_completion_ids"] if "kl_completion_ids" in e else examples[i - 1]["completion_ids"]
        out.append({"input_ids": (prompt + other)[:max_length],
                    "completion_mask": ([0] * len(prompt) + [1] * len(other))[:max_length]})
    return out


def collate_unpaired(examples: list[dict], pad_id: int, max_length: int, kl: bool = True,
                     packed: bool = False) -> dict:
    """Unpaired rows (B) then, with kl=True, their mismatched pairs (B): each pair shares its row's prompt, so
    the packed layout computes that prompt once. counts: the desirable and undesirable rows."""
    rows = [{"input_ids": e["input_ids"], "completion_mask": e["completion_mask"]} for e in examples]
    pairs = mismatched(examples, max_length) if kl else []
    batch = pad_batch(rows + pairs, pad_id)
    if packed:
        batch["packed"] = pack([[r, p] for r, p in zip(rows, pairs)] if kl else [[r] for r in rows], pad_id)
    batch["label"] = torch.tensor([e["label"] for e in examples])
    batch["kl_pairs"] = kl
    desirable = int(batch["label"].sum())
    batch["count"] = batch["samples"] = len(examples)  # rows the loss averages over
    batch["counts"] = {"desirable": desirable, "undesirable": len(examples) - desirable}
    for name in ("ref_logps", "ref_kl_logps"):
        if name in examples[0]:
            batch[name] = torch.tensor([e[name] for e in examples])
    return batch


def to_device(batch: dict, device) -> dict:
    """Every tensor of a batch (and of nested dicts: the packed layout) on `device`."""
    return {k: v.to(device) if torch.is_tensor(v) else to_device(v, device) if isinstance(v, dict) else v
            for k, v in batch.items()}
