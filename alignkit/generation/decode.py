"""The rollout decoder: every sampling path's (PPO, GRPO/RLOO groups, `alignkit generate`, eval, BitDelta's gold).

transformers' `generate` runs a chain of logits processors, stopping criteria and cache bookkeeping around every
step; for small batches on a CPU that costs as much as the model. Here the left-padded prompts go through the
model once (forward/policy.prompt_cache: an adapter's virtual tokens in front, positions numbered from the
attention mask as generate() numbers them), their KV cache is repeated for a group's G completions, and each step
is one forward of the new tokens plus a few tensor ops on the device: temperature, top-k, top-p (the order of
transformers' warpers), one multinomial draw (argmax at temperature 0), EOS bookkeeping. A row that has drawn an
EOS leaves the batch (its cache rows dropped), so later steps cost what the running rows cost.

The log-probs of the drawn tokens are those of logits / temperature, unfiltered: what a plain forward of prompt +
completion gives (forward/policy.response_forward) and what PPO/GRPO recompute as old log-probs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..forward.policy import prompt_cache
from ..forward.virtual import cache_argument


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float        # 0 = greedy
    top_k: int                # 0 = off
    top_p: float              # 1 = off
    eos: tuple[int, ...]      # a row stops at the first of these (none: it runs max_new_tokens)
    pad: int                  # what follows a row's EOS
    merge: bool | None = False  # LoRA-family adapter merged while sampling: true, false, null = DoRA only (merge.py)


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
    """(drawn tokens (N,), their log-probs under logits / temperature, unfiltered (N,)); greedy at temperature 0
    (log-probs then of the raw logits)."""
    logits = logits.float()
    if s.temperature == 0:
        token = logits.argmax(-1)
        return token, logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]
    token = draw(filtered_logits(logits, s).softmax(-1), generator)
    return token, (logits / s.temperature).log_softmax(-1).gather(-1, token[:, None])[:, 0]


def draw(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row (N, V) -> (N,), drawn with probability probs: the first whose cumulative probability
    exceeds a uniform draw. One random number per row (torch.multinomial draws one per vocabulary entry, which
    costs more than the rest of the sampling at a 49k vocabulary on a CPU)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # u < total strictly (rand * total can round up to it): the token found has cdf > u >= the cdf before it,
    # so a probability > 0 (filtered tokens, whose cdf equals their predecessor's, are never drawn)
    u = (torch.rand(probs.shape[0], 1, device=probs.device, generator=generator) * total).minimum(
        torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)[:, 0]


@torch.no_grad()
def decode(model, ids: torch.Tensor, attn: torch.Tensor, s: Sampling, group: int = 1,
           generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuations of B left-padded prompts (ids, attn: (B, P)), `group` of each: (tokens (B x group, n), their
    log-probs (B x group, n)), prompt b's in rows b*group .. b*group + group-1; n <= s.max_new_tokens (the steps
    taken). After a row's EOS its tokens are s.pad and its log-probs 0; the loop ends when every row has one."""
    module, cache, mask, logits = prompt_cache(model, ids, attn, last=True)
    if group > 1:
        cache.batch_repeat_interleave(group)
        mask, logits = mask.repeat_interleave(group, 0), logits.repeat_interleave(group, 0)
    key = cache_argument(model.get_base_model() if hasattr(model, "get_base_model") else model)
    n, steps, device = logits.shape[0], s.max_new_tokens, ids.device
    eos = torch.tensor(s.eos or (-1,), device=device)
    tokens = torch.full((n, steps), s.pad, device=device)
    logps = torch.zeros(n, steps, device=device)
    rows, t = torch.arange(n, device=device), 0
    for t in range(steps):
        drawn, logp = next_tokens(logits, s, generator)
        tokens[rows, t], logps[rows, t] = drawn, logp
        running = ~torch.isin(drawn, eos)
        if t == steps - 1 or not running.any():
            break
        if not running.all():  # finished rows leave: the cache keeps the others'
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, drawn, mask = rows[keep], drawn[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        logits = module(input_ids=drawn[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                        use_cache=True, **{key: cache}).logits[:, -1]
    return tokens[:, :t + 1], logps[:, :t + 1]
