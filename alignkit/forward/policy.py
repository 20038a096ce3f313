"""The forward pass over sampled responses: log-probs (and values, entropy) of the last n tokens."""
from __future__ import annotations

import torch

from ..objectives import token_logps
from .virtual import virtual_token_inputs


def response_forward(model, ids, attn, n_resp: int, temperature: float, values: bool = False):
    """(log-probs, values or None, entropy) of the last n_resp tokens, each (B, n_resp).

    Counted from the end, so prompt tuning's soft tokens at the front change nothing; positions
    follow the (virtual-token-extended) attention mask, as generate numbered them. Log-probs use
    logits / temperature (the distribution the tokens were sampled from). values: the model's value head
    (`model.v_head`, an online method's) on the hidden state before each token.
    """
    module, inputs, _ = virtual_token_inputs(model, ids, attn)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    width = inputs["inputs_embeds"].shape[1] if "inputs_embeds" in inputs else ids.shape[1]
    out = module(**inputs, position_ids=positions[:, -width:], output_hidden_states=values,
                 logits_to_keep=n_resp + 1)
    logits = out.logits[:, :-1].float() / temperature
    logp = token_logps(logits, ids[:, -n_resp:])
    value = None
    if values:
        hidden = out.hidden_states[-1][:, -(n_resp + 1):-1]
        value = model.v_head(hidden.to(model.v_head.weight.dtype)).squeeze(-1).float()
    with torch.no_grad():
        probs = logits.softmax(-1)
        entropy = torch.logsumexp(logits, -1) - (probs * logits).sum(-1)
    return logp, value, entropy


def add_value_head(model, device) -> torch.nn.Linear:
    """V(s) = w . h(s) on the policy's last hidden state, zero-initialised so the first advantages are plain
    returns. A submodule of the model: trained, checkpointed and restored with the adapter."""
    head = torch.nn.Linear(model.config.hidden_size, 1, bias=True).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model.v_head = head
    return head
