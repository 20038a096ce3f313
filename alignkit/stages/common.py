"""Helpers the stage runners share: forward log-probs, optimizer, precision."""
from __future__ import annotations

import contextlib
import warnings

import torch

from ..objectives import token_logps


def forward_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each next token and the completion mask they are counted under.

    The LM head runs only from the first position any row needs (logits_to_keep),
    so long shared prompts cost no vocabulary projection. Returns (B, T') each.
    """
    ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:]
    cols = mask.any(0).nonzero()
    start = int(cols[0]) if len(cols) else 0
    out = model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=ids.shape[1] - start)
    logits = out.logits[:, :-1]
    return token_logps(logits, ids[:, start + 1:]), mask[:, start:].float()


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob of each row and its completion token count, (B,) each."""
    lp, mask = forward_token_logps(model, batch)
    return (lp * mask).sum(-1), mask.sum(-1)


def score_head(model):
    """The score Linear of a sequence-classification model (peft's trainable copy when wrapped)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.score


def last_token_scores(model, batch: dict, head=None) -> torch.Tensor:
    """Reward of each row: the score head on the final hidden state of its last real token, (B,).

    Pooled by the attention mask (right padding), not by pad_token_id: with pad == eos an
    appended EOS would otherwise be skipped. head: a score Linear to use instead of the model's own
    (PPO scores with an RM head on top of the policy's base).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    hidden = out.hidden_states[-1]
    last = batch["attention_mask"].sum(-1) - 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    head = head or score_head(model)
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()


def disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0


def autocast(precision: str, device: torch.device):
    """Mixed precision context. `auto`: bf16 on a GPU that has it, fp32 otherwise."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(name: str, params, lr: float, weight_decay: float, device: torch.device):
    """adamw (torch) or bitsandbytes' 8-bit / paged AdamW; paged falls back off-GPU."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    if name.startswith("paged_") and device.type != "cuda":
        warnings.warn(f"train.optimizer={name}: paged optimizers need CUDA; using the non-paged version on "
                      f"{device.type}", stacklevel=2)
        name = name.removeprefix("paged_")
    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "adamw_32bit": torch.optim.AdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return cls(params, lr=lr, weight_decay=weight_decay)
