"""Sampling completions of prompts (text or token ids) with the rollout decoder (generation/decode.py)."""
from __future__ import annotations

import torch

from ..data.tokenize import encode_prompt
from .decode import Sampling, decode
from .merge import merged


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt as the model sees it before its reply: chat template + generation prompt when it has one."""
    if isinstance(prompt, str) and tokenizer.chat_template:
        prompt = [{"role": "user", "content": prompt}]
    return encode_prompt(tokenizer, prompt)


def generation_config(tokenizer, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      merge: bool | None = False) -> Sampling:
    """The decoder's settings: greedy when temperature is 0 (no filters then); stops at the tokenizer's EOS.
    merge: a LoRA-family adapter merged into the weights while decoding (true; null: DoRA only; merge.py)."""
    sampled = temperature > 0
    eos = tokenizer.eos_token_id
    return Sampling(max_new_tokens, temperature, top_k if sampled else 0, top_p if sampled else 1.0,
                    tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,)),
                    tokenizer.pad_token_id, merge)


def sampling_config(tokenizer, sample, max_new_tokens: int | None = None) -> Sampling:
    """generation_config from a sampling section (cfg.sample, or an online method's sampling keys)."""
    return generation_config(tokenizer, max_new_tokens or sample.max_new_tokens, sample.temperature, sample.top_k,
                             sample.top_p, sample.merge_for_generation)


def left_pad(chunk: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, chunk))
    ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
    return ids, mask


def generate(model, tokenizer, prompts: list, sample, device, seed: int = 0) -> list[str]:
    """Completions (text, special tokens dropped) for each prompt; sample = cfg.sample."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    gen = sampling_config(tokenizer, sample)
    torch.manual_seed(seed)
    out = []
    with merged(model, gen.merge):
        for i in range(0, len(encoded), sample.batch_size):
            ids, mask = left_pad(encoded[i:i + sample.batch_size], tokenizer.pad_token_id, device)
            out += tokenizer.batch_decode(decode(model, ids, mask, gen)[0], skip_special_tokens=True)
    return out


def response_mask(resp: torch.Tensor, eos_id) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS (pads after it are 0); and whether each row has an EOS.
    eos_id: a token id or several."""
    is_eos = torch.isin(resp, torch.as_tensor(eos_id, device=resp.device))
    after_first = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_first).long(), is_eos.any(-1)


def sample_responses(model, tokenizer, prompts: list[list[int]], gen: Sampling, device, group: int = 1,
                     logps: bool = False):
    """`group` sampled completions of each token-id prompt (generation/decode.py: one prefill per prompt):
    (ids, attention, response mask, has EOS), prompt b's completions in rows b*group .. b*group + group-1; with
    logps also the drawn tokens' log-probs (logits / temperature; 0 after the EOS).

    ids = left-padded prompt + response, pads after the first EOS; the mask covers the last n columns.
    """
    ids, attn = left_pad(prompts, tokenizer.pad_token_id, device)
    with merged(model, gen.merge):
        resp, drawn = decode(model, ids, attn, gen, group)
    ids, attn = ids.repeat_interleave(group, 0), attn.repeat_interleave(group, 0)
    mask, has_eos = response_mask(resp, gen.eos or -1)
    out = torch.cat([ids, resp], 1), torch.cat([attn, mask], 1), mask, has_eos
    return (*out, drawn) if logps else out
