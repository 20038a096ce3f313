"""Forward pass over a packed batch (data/packing.py): the decoder once, the LM head only where a token counts.

The head runs in chunks of rows; while training each chunk is recomputed in the backward pass instead of
keeping its (rows x vocab) logits, so no (tokens x vocab) tensor ever exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# config fields that change logits after the LM head (softcapping, scaling): such models take the plain path
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                 "output_multiplier")
HEAD_CHUNK_ELEMENTS = 2 ** 24  # logits per head chunk (64 MB in fp32)


def causal_lm(model):
    """The transformers model inside a peft wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def can_pack(model) -> bool:
    """Plain causal LMs: no virtual tokens (prompt/prefix tuning), unscaled logits, sdpa or eager attention."""
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and peft_cfg.is_prompt_learning:
        return False
    inner = causal_lm(model)
    text = inner.config.get_text_config()
    if any(getattr(text, k, None) not in (None, 1.0) for k in SCALED_LOGITS):
        return False
    return inner.config._attn_implementation in ("sdpa", "eager") and inner.get_output_embeddings() is not None


def head_logps(hidden: torch.Tensor, head: torch.nn.Linear, target: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[target] per row, (N,) float32, in chunks; recomputed in backward."""
    chunk = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, head.weight, head.bias).float()
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    pieces = []
    for i in range(0, max(len(hidden), 1), chunk):
        h, t = hidden[i:i + chunk], target[i:i + chunk]
        pieces.append(checkpoint(part, h, t, use_reentrant=False) if grad else part(h, t))
    return torch.cat(pieces)


def packed_token_logps(model, packed: dict) -> torch.Tensor:
    """Log-prob of every counted token of a packed batch, (N,) float32, in packed['owner'] order."""
    inner = causal_lm(model)
    mask = packed["mask"]
    if inner.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=inner.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(inner.dtype).min)
    hidden = inner.base_model(input_ids=packed["input_ids"], attention_mask=mask,
                              position_ids=packed["position_ids"], use_cache=False).last_hidden_state
    picked = hidden.flatten(0, 1)[packed["pred"]]
    return head_logps(picked, inner.get_output_embeddings(), packed["target"])
