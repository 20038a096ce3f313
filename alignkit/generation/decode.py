"""A rollout decoder: batched sampling over a preallocated (static) KV cache, the sampling arithmetic on the
device, one model call per generated token.

transformers' `generate` runs a chain of logits processors, stopping criteria and cache bookkeeping around every
step; for small batches on a CPU that costs as much as the model itself. Here a step is one forward of the new
tokens plus a few tensor ops: temperature, then top-k, then top-p (the order of transformers' warpers), one
multinomial draw, EOS bookkeeping. Left padding is handled once, in the position ids and the attention mask.
Prompt and prefix tuning's virtual tokens go in at the prefill (embeddings in front, or their keys and values
written into the cache first). The log-probs of the sampled tokens are those of logits / temperature, unfiltered:
what a plain forward gives (forward.policy.response_forward) and what PPO-style ratios use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..forward.virtual import is_prompt_learning


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float   # 0 = greedy
    top_k: int           # 0 = off
    top_p: float         # 1 = off


def filtered_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits / temperature, then the top-k and top-p filters (as transformers' warpers, in that order)."""
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1)  # ascending: the tokens to drop come first
        tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - s.top_p
        tail[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(tail.scatter(-1, order, tail), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, s: Sampling, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampled tokens (B,), their log-probs under logits / temperature, unfiltered (B,)); greedy at temperature 0
    (log-probs then of the raw logits)."""
    logits = logits.float()
    if s.temperature == 0:
        token = logits.argmax(-1)
        return token, logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]
    token = torch.multinomial(filtered_logits(logits, s).softmax(-1), 1, generator=generator)[:, 0]
    return token, (logits / s.temperature).log_softmax(-1).gather(-1, token[:, None])[:, 0]


def prompt_inputs(model, ids: torch.Tensor, attn: torch.Tensor, cache) -> tuple[object, dict, torch.Tensor]:
    """(module, prefill kwargs, the extended attention mask): the prompt, with a prompt or prefix adapter's virtual
    tokens (embeddings in front; or their keys and values written into `cache` first)."""
    if not is_prompt_learning(model) or not model.has_active_enabled_adapter:
        return (model.get_base_model() if is_prompt_learning(model) else model), {"input_ids": ids}, attn
    base, config, batch = model.get_base_model(), model.active_peft_config, ids.shape[0]
    mask = torch.cat([attn.new_ones(batch, config.num_virtual_tokens), attn], 1)
    if config.peft_type == "PREFIX_TUNING":
        prefix = model.get_prompt(batch)
        for layer in range(len(prefix.layers)):
            cache.update(prefix.layers[layer].keys, prefix.layers[layer].values, layer)
        return base, {"input_ids": ids}, mask
    embeds = base.get_input_embeddings()(ids)
    return base, {"inputs_embeds": torch.cat([model.get_prompt(batch_size=batch).to(embeds.dtype), embeds], 1)}, mask


@torch.no_grad()
def decode(model, ids: torch.Tensor, attn: torch.Tensor, s: Sampling, eos_id: int, pad_id: int,
           generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuations of left-padded prompts (ids, attn: (B, P)): (tokens (B, n), log-probs (B, n)), n <= max_new_tokens;
    after a row's first EOS its tokens are pad_id and its log-probs 0. Stops when every row has its EOS."""
    from transformers import StaticCache

    batch = ids.shape[0]
    virtual = model.active_peft_config.num_virtual_tokens if is_prompt_learning(model) and \
        model.has_active_enabled_adapter else 0
    cache = StaticCache(config=model.config, max_cache_len=virtual + ids.shape[1] + s.max_new_tokens)
    module, inputs, mask = prompt_inputs(model, ids, attn, cache)
    width = mask.shape[1]
    mask = torch.cat([mask, mask.new_zeros(batch, s.max_new_tokens)], 1)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    prefill_width = inputs["inputs_embeds"].shape[1] if "inputs_embeds" in inputs else ids.shape[1]
    out = module(**inputs, attention_mask=mask[:, :width], position_ids=positions[:, -prefill_width:], cache=cache,
                 use_cache=True, logits_to_keep=1)
    position = positions[:, -1]
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    tokens, logps = [], []
    for t in range(s.max_new_tokens):
        token, logp = next_tokens(out.logits[:, -1], s, generator)
        tokens.append(token.masked_fill(done, pad_id))
        logps.append(logp.masked_fill(done, 0.0))
        done = done | (token == eos_id)
        if t == s.max_new_tokens - 1 or bool(done.all()):
            break
        mask[:, width + t] = 1
        position = position + 1
        out = module(input_ids=tokens[-1][:, None], attention_mask=mask[:, :width + t + 1],
                     position_ids=position[:, None], cache=cache, use_cache=True)
    return torch.stack(tokens, 1), torch.stack(logps, 1)
