"""score(prompts, completions) with a trained reward-model run directory."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.collate import pad_batch
from ..data.tokenize import encode_pair
from ..errors import UsageError
from ..models.load import load_run
from ..stages.common import last_token_scores


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


def load_scorer(run_dir: str | Path, device: torch.device | None = None, batch_size: int = 8):
    """Return score(prompts, completions) -> (N,) rewards, for strings or chat-message lists."""
    model, tokenizer, cfg = load_run(run_dir, device)
    if cfg.method.name != "rm":
        raise UsageError(f"{run_dir} is a {cfg.method.name} run, not a reward model (method=rm)")

    def score(prompts: list, completions: list) -> torch.Tensor:
        return score_texts(model, tokenizer, prompts, completions, cfg.data.max_length, batch_size)

    return score
