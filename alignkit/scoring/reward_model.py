"""Scores from a trained reward model: its score head on the last real token of prompt + completion.

A reward model trained as a LoRA adapter on the policy's own base is loaded as a second adapter
("reward") with its score head, so no second copy of the base is in memory; any other is its own model.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.collate import pad_batch
from ..data.tokenize import encode_pair
from ..forward.scores import last_token_scores


def as_completion(prompt, text: str):
    """The completion in the prompt's format (a message list for chat prompts)."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def score_texts(model, tokenizer, prompts: list, completions: list, max_length: int, batch_size: int = 8,
                head=None):
    """Rewards (N,) of prompt + completion pairs, tokenised as the RM was trained (TRL's formats)."""
    device = next(model.parameters()).device
    examples = []
    for prompt, completion in zip(prompts, completions):
        p, c = encode_pair(tokenizer, prompt, completion, where="reward model input")
        ids = (p + c)[:max_length]
        examples.append({"input_ids": ids, "completion_mask": [0] * len(ids)})
    scores = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = pad_batch(examples[i:i + batch_size], tokenizer.pad_token_id)
            scores.append(last_token_scores(model, {k: v.to(device) for k, v in batch.items()}, head).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def texts_reward(score):
    """(rows, texts[, completion ids]) -> scores, from score(prompts, completions): completions in each prompt's
    format."""
    def reward(rows: list[dict], texts: list[str], completion_ids=None) -> torch.Tensor:
        prompts = [r["prompt"] for r in rows]
        return score(prompts, [as_completion(p, t) for p, t in zip(prompts, texts)])

    return reward


@contextlib.contextmanager
def active_adapter(model, name: str):
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def shared_base_reward(model, tokenizer, adapter_dir: Path, max_length: int, batch_size: int):
    """Load the RM's LoRA adapter (a run's final/) next to the policy's; score with its head on the same base."""
    model.load_adapter(str(adapter_dir), adapter_name="reward", is_trainable=False)
    head_weights = {k.split("score.")[-1]: v for k, v in load_file(Path(adapter_dir) / "adapter_model.safetensors").items()
                    if ".score." in f".{k}"}
    weight = head_weights["weight"]
    score = torch.nn.Linear(weight.shape[1], 1, bias="bias" in head_weights)
    score.load_state_dict(head_weights)
    score.requires_grad_(False)
    score = score.to(next(model.parameters()).device)

    def scored(prompts: list, completions: list) -> torch.Tensor:
        with active_adapter(model, "reward"):
            return score_texts(model, tokenizer, prompts, completions, max_length, batch_size, head=score)

    return texts_reward(scored)
