"""The forward pass over sampled responses: log-probs (and values, entropy) of the last n tokens."""
from __future__ import annotations

import torch

from ..objectives import token_logps
from .virtual import cache_argument, virtual_token_inputs


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
    return logp, value, entropy_of(logits)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of each position's distribution, without gradient."""
    with torch.no_grad():
        probs = logits.softmax(-1)
        return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate() numbers them: the count of attended tokens before each one (padding: 0)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def prompt_cache(model, prompt_ids: torch.Tensor, prompt_attn: torch.Tensor, last: bool = False):
    """(module, KV cache, attention mask, last logits) of U left-padded prompts run through `model` (an adapter's
    virtual tokens in front), up to but not including their last token, or (last=True) whole, then with the
    logits at the last token (U, V) (else None). The mask covers the virtual tokens and the whole prompt.
    `module(...)` continues from that cache: the model, or for prompt learning its base."""
    ids, attn = (prompt_ids, prompt_attn) if last else (prompt_ids[:, :-1], prompt_attn[:, :-1])
    module, inputs, _ = virtual_token_inputs(model, ids, attn)
    mask = inputs["attention_mask"] if last else torch.cat([inputs["attention_mask"], prompt_attn[:, -1:]], 1)
    width = inputs["inputs_embeds"].shape[1] if "inputs_embeds" in inputs else ids.shape[1]
    pos = positions(mask)[:, -width:] if last else positions(mask)[:, -1 - width:-1]
    out = module(**inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return module, cache, mask, out.logits[:, -1] if last else None


def completion_forward(model, prompt_ids, prompt_attn, owner, resp, resp_mask, temperature: float):
    """(log-probs, entropy) (N, T) of N completions `resp` (right-padded, mask resp_mask) of U prompts: completion
    i continues prompt owner[i]. Each prompt runs once (all but its last token) and its KV cache, selected per
    completion, carries the gradient back to it: G completions of a prompt cost one prompt forward, not G.
    Equal to response_forward on each prompt + completion row (positions as generate() gave them)."""
    module, cache, mask, _ = prompt_cache(model, prompt_ids, prompt_attn)
    cache.batch_select_indices(owner)
    full = torch.cat([mask[owner], resp_mask.to(mask.dtype)], 1)[:, :-1]  # the last token predicts nothing
    inputs = torch.cat([prompt_ids[owner, -1:], resp[:, :-1]], 1)  # the last prompt token, then the completion
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = module(input_ids=inputs, attention_mask=full, position_ids=positions(full)[:, -inputs.shape[1]:],
                 **{cache_argument(base): cache}, use_cache=True)
    logits = out.logits.float() / temperature
    return token_logps(logits, resp), entropy_of(logits)


def completions_logps(model, mb: dict, temperature: float):
    """(log-probs, entropy) (N, T) of a batch of completions {prompt_ids, prompt_attn (U, P), owner (N,), resp,
    mask (N, T), shared}: with `shared`, each prompt computed once (completion_forward); else (gradient
    checkpointing, which keeps no KV cache) as whole prompt + completion rows."""
    if mb["shared"] and mb["prompt_ids"].shape[1] > 1:
        return completion_forward(model, mb["prompt_ids"], mb["prompt_attn"], mb["owner"], mb["resp"],
                                  mb["resp_mask"], temperature)
    ids = torch.cat([mb["prompt_ids"][mb["owner"]], mb["resp"]], 1)
    attn = torch.cat([mb["prompt_attn"][mb["owner"]], mb["resp_mask"]], 1)
    logp, _, entropy = response_forward(model, ids, attn, mb["resp"].shape[1], temperature)
    return logp, entropy


def add_value_head(model, device) -> torch.nn.Linear:
    """V(s) = w . h(s) on the policy's last hidden state, zero-initialised so the first advantages are plain
    returns. A submodule of the model: trained, checkpointed and restored with the adapter."""
    head = torch.nn.Linear(model.config.hidden_size, 1, bias=True).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model.v_head = head
    return head
