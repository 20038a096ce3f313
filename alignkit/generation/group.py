"""Group rollouts: G sampled completions per prompt, the prompt prefilled once per group.

The B left-padded prompts, all but their last token, go through the model once; their KV cache is repeated
G times (DynamicCache.batch_repeat_interleave) and generate() continues every copy from the last prompt token,
so a prompt's G completions share one prefill instead of G. An adapter's virtual tokens go into that prefill
(prompt tuning: soft-token embeddings in front; prefix tuning: the K/V prefix as the starting cache), and the
positions are the ones generate() numbers from the attention mask, as in a plain forward.
"""
from __future__ import annotations

import torch

from ..forward.policy import prompt_cache
from ..forward.virtual import cache_argument
from .sample import left_pad, new_tokens, response_mask


def group_inputs(model, ids: torch.Tensor, attn: torch.Tensor, group: int):
    """(module, generate keywords) that continue each of the B prompts G times from one shared prefill.

    ids, attn: (B, P) left-padded prompts, P >= 2. The keywords hold the last prompt token of each of the
    B x G rows (prompt b's copies are rows b*G .. b*G + G-1), the whole attention mask (virtual tokens
    included) and the prefilled cache, so generate() runs only the new tokens and returns [last token, new...].
    """
    with torch.no_grad():
        module, cache, mask = prompt_cache(model, ids, attn)
    cache.batch_repeat_interleave(group)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # its generate takes the cache
    return module, {"input_ids": ids[:, -1:].repeat_interleave(group, 0),
                    "attention_mask": mask.repeat_interleave(group, 0), cache_argument(base): cache}


def sample_groups(model, tokenizer, prompts: list[list[int]], group: int, gen, device):
    """G completions of each token-id prompt: (ids, attention, response mask, has EOS), B x G rows.

    ids = left-padded prompt + response (pads after the first EOS); the response mask covers the last n columns.
    """
    ids, attn = left_pad(prompts, tokenizer.pad_token_id, device)
    with torch.no_grad():
        if ids.shape[1] < 2:  # nothing to prefill before the last token
            resp = new_tokens(model, ids.repeat_interleave(group, 0), attn.repeat_interleave(group, 0), gen)
        else:
            module, inputs = group_inputs(model, ids, attn, group)
            resp = module.generate(**inputs, generation_config=gen)[:, 1:]
    ids, attn = ids.repeat_interleave(group, 0), attn.repeat_interleave(group, 0)
    mask, has_eos = response_mask(resp, tokenizer.eos_token_id)
    resp = resp.masked_fill(mask == 0, tokenizer.pad_token_id)
    return torch.cat([ids, resp], 1), torch.cat([attn, mask], 1), mask, has_eos

