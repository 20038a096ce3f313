"""Group rollouts: G sampled completions per prompt, the prompt prefilled once per group.

The B left-padded prompts go through the model once (forward/policy.prompt_cache: an adapter's virtual tokens
in front, positions numbered from the attention mask as generate() numbers them); their KV cache and
last-token logits are repeated G times, and a plain sampling loop continues every copy: a prompt's G completions
share one prefill instead of G. A completion that has emitted EOS leaves the batch (its cache rows dropped),
so the steps after it cost what the completions still running cost, not the longest one's batch.

Tokens are drawn as generate() draws them: logits / temperature, top-k, top-p (transformers' logits warpers),
then one multinomial draw per row (greedy: argmax when temperature is 0).
"""
from __future__ import annotations

import torch

from ..forward.policy import prompt_cache
from ..forward.virtual import cache_argument
from .sample import left_pad, response_mask


def warpers(gen):
    """transformers' logits warpers for a GenerationConfig's temperature, top_k and top_p (sampling only)."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    out = LogitsProcessorList()
    if gen.temperature is not None and gen.temperature != 1.0:
        out.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_k:
        out.append(TopKLogitsWarper(top_k=gen.top_k))
    if gen.top_p is not None and gen.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=gen.top_p))
    return out


def decode(module, cache, logits, mask, gen, cache_key: str):
    """Sample up to gen.max_new_tokens tokens for each row from its first logits (N, V), its cache and
    attention mask; rows leave the batch at EOS. Returns (tokens (N, T) padded with gen.pad_token_id, the
    log-probs of the drawn tokens under the distribution they were drawn from (N, T)); T = the steps taken."""
    n, steps = logits.shape[0], gen.max_new_tokens
    eos = torch.tensor(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id],
                       device=logits.device)
    tokens = torch.full((n, steps), gen.pad_token_id, device=logits.device)
    logps = torch.zeros(n, steps, device=logits.device)
    rows, warp, t = torch.arange(n, device=logits.device), warpers(gen), 0
    for t in range(steps):
        scores = warp(tokens[rows, :t], logits.float()) if gen.do_sample else logits.float()
        drawn = torch.multinomial(scores.softmax(-1), 1).squeeze(1) if gen.do_sample else scores.argmax(-1)
        tokens[rows, t] = drawn
        logps[rows, t] = torch.log_softmax(scores, -1).gather(-1, drawn[:, None]).squeeze(1)
        running = ~torch.isin(drawn, eos)
        if t == steps - 1 or not running.any():
            break
        if not running.all():  # finished rows leave: the cache keeps the others'
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, drawn, mask = rows[keep], drawn[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        out = module(input_ids=drawn[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                     use_cache=True, **{cache_key: cache})
        logits = out.logits[:, -1]
    return tokens[:, :t + 1], logps[:, :t + 1]


def sample_groups(model, tokenizer, prompts: list[list[int]], group: int, gen, device, logps: bool = False):
    """G completions of each token-id prompt: (ids, attention, response mask, has EOS), B x G rows, prompt b's
    completions in rows b*G .. b*G + G-1; with logps also the drawn tokens' log-probs (B x G, n).

    ids = left-padded prompt + response (pads after the first EOS); the response mask covers the last n columns.
    """
    ids, attn = left_pad(prompts, tokenizer.pad_token_id, device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        module, cache, mask, logits = prompt_cache(model, ids, attn, last=True)
        cache.batch_repeat_interleave(group)
        resp, drawn = decode(module, cache, logits.repeat_interleave(group, 0), mask.repeat_interleave(group, 0),
                             gen, cache_argument(base))
    ids, attn = ids.repeat_interleave(group, 0), attn.repeat_interleave(group, 0)
    mask, has_eos = response_mask(resp, gen.eos_token_id)
    resp = resp.masked_fill(mask == 0, tokenizer.pad_token_id)
    out = torch.cat([ids, resp], 1), torch.cat([attn, mask], 1), mask, has_eos
    return (*out, drawn * mask) if logps else out
