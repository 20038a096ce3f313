"""Log-probs of the counted (completion) tokens: padded batches, or packed ones when the batch and model allow."""
from __future__ import annotations

import torch

from ..objectives import token_logps
from .packed import can_pack, packed_token_logps
from .virtual import input_positions, virtual_token_inputs


def forward_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each next token and the completion mask they are counted under.

    The LM head runs only from the first position any row needs (logits_to_keep),
    so long shared prompts cost no vocabulary projection. logits_to_keep counts from
    the end, so prompt tuning's soft tokens in front are never among the kept
    positions: the logit at kept position t predicts input token start + t + 1 with
    or without an adapter's virtual tokens. Returns (B, T') each.
    """
    ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:]
    cols = mask.any(0).nonzero()
    start = int(cols[0]) if len(cols) else 0
    keep = ids.shape[1] - start
    module, inputs, _ = virtual_token_inputs(model, ids, batch["attention_mask"])
    logits = input_positions(module(**inputs, logits_to_keep=keep).logits, keep, virtual=0)
    return token_logps(logits[:, :-1], ids[:, start + 1:]), mask[:, start:].float()


def uses_packed(model, batch: dict) -> bool:
    return "packed" in batch and can_pack(model)


def counted_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the counted tokens and their mask: packed (N,) each when the batch and model allow it,
    else the padded (B, T') of forward_token_logps."""
    if uses_packed(model, batch):
        lp = packed_token_logps(model, batch["packed"])
        return lp, torch.ones_like(lp)
    return forward_token_logps(model, batch)


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob of each row and its completion token count, (B,) each."""
    if uses_packed(model, batch):
        packed = batch["packed"]
        lp = packed_token_logps(model, packed)
        sums = torch.zeros(len(packed["tokens"]), device=lp.device).index_add(0, packed["owner"], lp)
        return sums, packed["tokens"].float()
    lp, mask = forward_token_logps(model, batch)
    return (lp * mask).sum(-1), mask.sum(-1)
