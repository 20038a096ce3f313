"""Batched generation with the KV cache (greedy or sampled), left-padded prompts."""
from __future__ import annotations

import torch

from ..adapters.prompt import virtual_token_inputs
from ..data.tokenize import encode_prompt


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


def left_pad(chunk: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, chunk))
    ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
    return ids, mask


def generate(model, tokenizer, prompts: list, sample, device, seed: int = 0) -> list[str]:
    """Completions (text, special tokens dropped) for each prompt; sample = cfg.sample."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    gen = generation_config(tokenizer, sample.max_new_tokens, sample.temperature, sample.top_k, sample.top_p)
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(encoded), sample.batch_size):
            ids, mask = left_pad(encoded[i:i + sample.batch_size], tokenizer.pad_token_id, device)
            # a prompt/prefix adapter's virtual tokens go in as embeddings or a prefilled KV cache
            module, inputs, _ = virtual_token_inputs(model, ids, mask)
            seqs = module.generate(**inputs, generation_config=gen)
            # from inputs_embeds, generate returns only the new tokens; from input_ids, prompt + new
            out += tokenizer.batch_decode(seqs[:, ids.shape[1]:] if "input_ids" in inputs else seqs,
                                          skip_special_tokens=True)
    return out
