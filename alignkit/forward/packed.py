"""Forward pass over a packed batch (data/packing.py): the decoder once, the LM head only where a token counts.

The head runs in chunks of rows; while training each chunk is recomputed in the backward pass instead of
keeping its (rows x vocab) logits, so no (tokens x vocab) tensor ever exists. The head is called as the
module it is, so an adapter on it (LoRA on lm_head, modules_to_save) counts exactly as in a plain forward.

transformers uses a custom 4-D mask as it is, for every layer: sliding-window layers would see the whole
sequence. So the window goes into the mask here: a token sees at most `sliding_window` positions of its own
sequence (itself included), as transformers' own sliding-window masks do; a model whose layers differ
(config.layer_types) gets one mask per layer type.
"""
from __future__ import annotations

import sys

import torch
from torch.utils.checkpoint import checkpoint

# config fields that change logits after the LM head (softcapping, scaling): such models take the plain path
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                 "output_multiplier")
MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")  # the layer types a packed mask can express
HEAD_CHUNK_ELEMENTS = 2 ** 24  # logits per head chunk (64 MB in fp32)
_told: set[str] = set()


def causal_lm(model):
    """The transformers model inside a peft wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def layer_types(config) -> list[str]:
    """Each decoder layer's attention kind: config.layer_types, else all full or all sliding (sliding_window)."""
    text = config.get_text_config()
    types = getattr(text, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(text, "sliding_window", None) else "full_attention"
    return [kind] * text.num_hidden_layers


def can_pack(model) -> bool:
    """Plain causal LMs: no virtual tokens (prompt/prefix tuning), unscaled logits, sdpa or eager attention,
    full or sliding-window layers only."""
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and peft_cfg.is_prompt_learning:
        return False
    inner = causal_lm(model)
    text = inner.config.get_text_config()
    if any(getattr(text, k, None) not in (None, 1.0) for k in SCALED_LOGITS):
        return False
    other = set(layer_types(inner.config)) - set(MASKED_LAYER_TYPES)
    if other:
        _say_once(f"alignkit: {type(inner).__name__} has {', '.join(sorted(other))} layers, which a packed mask "
                  f"cannot express: training on padded batches (train.packing has no effect)")
        return False
    return inner.config._attn_implementation in ("sdpa", "eager") and inner.get_output_embeddings() is not None


def _say_once(message: str) -> None:
    if message not in _told:
        _told.add(message)
        print(message, file=sys.stderr)


def head_logps(hidden: torch.Tensor, head: torch.nn.Module, target: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[target] per row, (N,) float32, in chunks. A frozen plain head gets its
    gradient with the forward (FrozenHeadLogps); any other is recomputed chunk by chunk in backward."""
    vocab = head.weight.shape[0]
    chunk = max(1, HEAD_CHUNK_ELEMENTS // vocab)
    if type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters()):
        return FrozenHeadLogps.apply(hidden, head.weight, head.bias, target, chunk)

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    pieces = []
    for i in range(0, max(len(hidden), 1), chunk):
        h, t = hidden[i:i + chunk], target[i:i + chunk]
        pieces.append(checkpoint(part, h, t, use_reentrant=False) if grad else part(h, t))
    return torch.cat(pieces)


class FrozenHeadLogps(torch.autograd.Function):
    """log softmax(hidden W^T + b)[target] for a head that does not train. The gradient with respect to a
    hidden row, W[target] - softmax(logits) W, does not depend on the loss, so the forward computes it chunk
    by chunk next to the log-prob; backward is one multiply by the incoming gradient. Against the autograd
    path that is one vocabulary-sized product (the logits' recomputation) instead of two, and the same
    numbers (the same logits; the gradient's product in another order)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk):
        logps = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for i in range(0, len(hidden), chunk):
            h, t = hidden[i:i + chunk], target[i:i + chunk]
            logits = torch.nn.functional.linear(h, weight, bias).float()
            lse = logits.logsumexp(-1)
            logps[i:i + chunk] = logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - lse
            if grad is not None:  # softmax - onehot, then times W: minus the gradient of log p[t]
                probs = logits.sub_(lse.unsqueeze(-1)).exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[i:i + chunk] = -(probs.to(weight.dtype) @ weight)  # autocast: in its dtype, as autograd
        ctx.save_for_backward(grad)
        return logps

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g.unsqueeze(-1).to(grad.dtype) * grad, None, None, None, None


def layer_masks(config, mask: torch.Tensor, positions: torch.Tensor):
    """The packed (R, 1, L, L) bool mask as the model's layers need it: one tensor when every layer is the
    same kind, else {layer type: mask} (transformers' per-type mask mapping). A sliding layer's mask also
    hides keys `window` or more positions back (position ids restart per sequence, and a token only sees
    its own sequence, so this is the window within its own sequence)."""
    window = config.get_text_config().sliding_window if "sliding_attention" in layer_types(config) else None
    masks = {"full_attention": mask}
    if window is not None:
        back = positions.unsqueeze(-1) - positions.unsqueeze(-2)  # (R, L, L): query pos - key pos
        masks["sliding_attention"] = mask & (back < window).unsqueeze(1)
    kinds = set(layer_types(config))
    if len(kinds) == 1:
        return masks[kinds.pop()]
    return {k: masks[k] for k in kinds}


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as eager attention adds it to the scores: 0 where allowed, the dtype's min elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def packed_token_logps(model, packed: dict) -> torch.Tensor:
    """Log-prob of every counted token of a packed batch, (N,) float32, in packed['owner'] order."""
    inner = causal_lm(model)
    mask = layer_masks(inner.config, packed["mask"], packed["position_ids"])
    if inner.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = {k: additive(v, inner.dtype) for k, v in mask.items()} if isinstance(mask, dict) \
            else additive(mask, inner.dtype)
    hidden = inner.base_model(input_ids=packed["input_ids"], attention_mask=mask,
                              position_ids=packed["position_ids"], use_cache=False).last_hidden_state
    picked = hidden.flatten(0, 1)[packed["pred"]]
    return head_logps(picked, inner.get_output_embeddings(), packed["target"])
