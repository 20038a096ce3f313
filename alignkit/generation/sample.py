"""Batched generation with the KV cache (greedy or sampled), left-padded prompts, virtual tokens included."""
from __future__ import annotations

import torch

from ..data.tokenize import encode_prompt
from ..forward.virtual import virtual_token_inputs


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt as the model sees it before its reply: chat template + generation prompt when it has one."""
    if isinstance(prompt, str) and tokenizer.chat_template:
        prompt = [{"role": "user", "content": prompt}]
    return encode_prompt(tokenizer, prompt)


def generation_config(tokenizer, max_new_tokens: int, temperature: float, top_k: int, top_p: float):
    """Greedy when temperature is 0; always with the KV cache; stops at EOS."""
    from transformers import GenerationConfig

    sampled = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sampled, temperature=temperature if sampled else None,
        top_k=top_k if sampled else None, top_p=top_p if sampled else None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
    )


def sampling_config(tokenizer, sample, max_new_tokens: int | None = None):
    """generation_config from a sampling section (cfg.sample, or an online method's sampling keys)."""
    return generation_config(tokenizer, max_new_tokens or sample.max_new_tokens, sample.temperature, sample.top_k,
                             sample.top_p)


def left_pad(chunk: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, chunk))
    ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
    return ids, mask


def new_tokens(model, ids: torch.Tensor, attn: torch.Tensor, gen) -> torch.Tensor:
    """The tokens generate() adds after left-padded prompts, (B, n); a prompt or prefix adapter's virtual tokens
    go in as embeddings or a prefilled KV cache."""
    module, inputs, _ = virtual_token_inputs(model, ids, attn)
    seqs = module.generate(**inputs, generation_config=gen)
    return seqs[:, ids.shape[1]:] if "input_ids" in inputs else seqs  # from embeddings: new tokens only


def generate(model, tokenizer, prompts: list, sample, device, seed: int = 0) -> list[str]:
    """Completions (text, special tokens dropped) for each prompt; sample = cfg.sample."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    gen = sampling_config(tokenizer, sample)
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(encoded), sample.batch_size):
            ids, mask = left_pad(encoded[i:i + sample.batch_size], tokenizer.pad_token_id, device)
            out += tokenizer.batch_decode(new_tokens(model, ids, mask, gen), skip_special_tokens=True)
    return out


def response_mask(resp: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS (pads after it are 0); and whether each row has an EOS."""
    is_eos = resp == eos_id
    after_first = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_first).long(), is_eos.any(-1)


def sample_responses(model, tokenizer, prompts: list[list[int]], gen, device):
    """Sampled completions of token-id prompts: (ids, attention, response mask, has EOS).

    ids = left-padded prompt + response, pads after the first EOS; the mask covers the last n columns.
    """
    ids, attn = left_pad(prompts, tokenizer.pad_token_id, device)
    with torch.no_grad():
        resp = new_tokens(model, ids, attn, gen)
    mask, has_eos = response_mask(resp, tokenizer.eos_token_id)
    resp = resp.masked_fill(mask == 0, tokenizer.pad_token_id)
    return torch.cat([ids, resp], 1), torch.cat([attn, mask], 1), mask, has_eos
