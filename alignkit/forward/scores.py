"""Scalar scores of sequences: a reward model's head on the last real token."""
from __future__ import annotations

import torch

from .packed import causal_lm
from .virtual import input_positions, virtual_token_inputs


def score_head(model):
    """The score Linear of a sequence-classification model (peft's trainable copy when wrapped)."""
    return causal_lm(model).score


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
