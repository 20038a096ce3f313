"""Helpers the stage runners share: forward log-probs, optimizer, precision."""
from __future__ import annotations

import contextlib
import warnings

import torch

from ..adapters.prompt import virtual_token_inputs
from ..objectives import token_logps
from .packed import can_pack, causal_lm, packed_token_logps


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


def input_positions(x: torch.Tensor, length: int, virtual: int) -> torch.Tensor:
    """(B, virtual + length, ...) -> (B, length, ...): drop the positions of prompt tuning's soft tokens.

    Any other length is an error, never a silent shift of the alignment.
    """
    if x.shape[1] != virtual + length:
        raise RuntimeError(f"model output covers {x.shape[1]} positions; expected {length} input positions "
                           f"after {virtual} virtual tokens")
    return x[:, virtual:]


def counted_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the counted tokens and their mask: packed (N,) each when the batch and model allow it,
    else the padded (B, T') of forward_token_logps."""
    if uses_packed(model, batch):
        lp = packed_token_logps(model, batch["packed"])
        return lp, torch.ones_like(lp)
    return forward_token_logps(model, batch)


def uses_packed(model, batch: dict) -> bool:
    return "packed" in batch and can_pack(model)


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob of each row and its completion token count, (B,) each."""
    if uses_packed(model, batch):
        packed = batch["packed"]
        lp = packed_token_logps(model, packed)
        sums = torch.zeros(len(packed["tokens"]), device=lp.device).index_add(0, packed["owner"], lp)
        return sums, packed["tokens"].float()
    lp, mask = forward_token_logps(model, batch)
    return (lp * mask).sum(-1), mask.sum(-1)


def score_head(model):
    """The score Linear of a sequence-classification model (peft's trainable copy when wrapped)."""
    inner = causal_lm(model)
    return inner.score


def last_token_scores(model, batch: dict, head=None) -> torch.Tensor:
    """Reward of each row: the score head on the final hidden state of its last real token, (B,).

    Pooled by the attention mask (right padding), not by pad_token_id: with pad == eos an
    appended EOS would otherwise be skipped. head: a score Linear to use instead of the model's own
    (PPO scores with an RM head on top of the policy's base).
    """
    module, inputs, virtual = virtual_token_inputs(model, batch["input_ids"], batch["attention_mask"])
    out = module(**inputs, output_hidden_states=True)
    hidden = input_positions(out.hidden_states[-1], batch["input_ids"].shape[1], virtual)
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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else to_device(v, device) if isinstance(v, dict) else v
            for k, v in batch.items()}


def packing(cfg) -> bool:
    """train.packing, except for prompt/prefix tuning (their virtual tokens need the padded layout)."""
    return cfg.train.packing and cfg.adapter.name not in ("prompt", "prefix")
