"""Batched generation with the KV cache (greedy or sampled), left-padded prompts."""
from __future__ import annotations

import torch

from ..adapters.prompt import virtual_token_inputs
from ..data.tokenize import is_conversational


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt as the model sees it before its reply: chat template + generation prompt when it has one."""
    if isinstance(prompt, str) and tokenizer.chat_template:
        prompt = [{"role": "user", "content": prompt}]
    if is_conversational(prompt):
        out = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        return list(out["input_ids"])
    return tokenizer(prompt)["input_ids"]


def generate(model, tokenizer, prompts: list, sample, device, seed: int = 0) -> list[str]:
    """Completions (text, special tokens dropped) for each prompt; sample = cfg.sample."""
    from transformers import GenerationConfig

    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id
    gen = GenerationConfig(
        max_new_tokens=sample.max_new_tokens, do_sample=sample.temperature > 0,
        temperature=sample.temperature if sample.temperature > 0 else None,
        top_k=sample.top_k if sample.temperature > 0 else None,
        top_p=sample.top_p if sample.temperature > 0 else None,
        # use_cache must stay on: a prefix adapter's K/V prefix is the prefilled cache
        pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True,
    )
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(encoded), sample.batch_size):
            chunk = encoded[i:i + sample.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
            # a prompt/prefix adapter's virtual tokens go in as embeddings or a prefilled KV cache
            module, inputs, _ = virtual_token_inputs(model, ids, mask)
            seqs = module.generate(**inputs, generation_config=gen)
            # from inputs_embeds, generate returns only the new tokens; from input_ids, prompt + new
            out += tokenizer.batch_decode(seqs[:, width:] if "input_ids" in inputs else seqs,
                                          skip_special_tokens=True)
    model.train(was_training)
    return out
