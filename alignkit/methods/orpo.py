"""ORPO (Hong et al. 2024): SFT and preference learning in one stage, no reference model.

loss = NLL of the chosen answer (a mean over its tokens) + beta (lambda) x mean over pairs of
-log sigmoid(log odds(y_w) - log odds(y_l)), the odds on average completion log-probs. The NLL covers the
chosen answer (the paper) or, with method.nll_on_prompt=true, its prompt too (TRL's ORPOTrainer). Batches are
DPO's: chosen rows then rejected rows, and in the packed layout each prompt is computed once for both answers
(not with nll_on_prompt: the chosen prompt's tokens are then counted on their own).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from omegaconf import MISSING

from ..adapters import ADAPTERS, packing
from ..data.tokenize import encode_rows
from ..errors import require
from .dpo import pair_stats
from .record import Method


@dataclass
class ORPOMethod:
    name: str = MISSING
    beta: float = MISSING
    nll_on_prompt: bool = MISSING


def flat_logps(model, batch: dict):
    """(log-prob (N,), row (N,)) of every counted token of the batch, each row's tokens together and in order."""
    import torch

    from ..forward.logps import forward_token_logps, uses_packed
    from ..forward.packed import packed_token_logps

    if uses_packed(model, batch):
        return packed_token_logps(model, batch["packed"]), batch["packed"]["owner"]
    lp, mask = forward_token_logps(model, batch)
    keep = mask.bool()
    rows = torch.arange(len(mask), device=mask.device).unsqueeze(1).expand_as(mask)
    return lp[keep], rows[keep]


def answer_logps(lp, rows, tokens, answer_tokens):
    """Each row's summed log-prob of its answer: the last answer_tokens[row] of its tokens[row] counted tokens
    (a row's tokens are together and in order)."""
    import torch

    index = torch.arange(len(lp), device=lp.device)
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[1:] = rows[1:] != rows[:-1]
    first = torch.cummax(torch.where(starts, index, 0), 0).values  # where each token's row begins
    in_answer = tokens[rows] - (index - first) <= answer_tokens[rows]
    return torch.zeros(len(tokens), device=lp.device).index_add(0, rows, lp * in_answer)


def orpo_step(model, batch: dict, denominator: int, method):
    import torch

    from ..objectives import odds_ratio_loss

    n = batch["count"]
    lp, rows = flat_logps(model, batch)
    tokens = torch.bincount(rows, minlength=2 * n)
    answer_tokens = tokens.clone()
    if "answer_tokens" in batch:  # nll_on_prompt: the chosen rows count their prompt tokens too
        answer_tokens[:n] = batch["answer_tokens"]
    avg = answer_logps(lp, rows, tokens, answer_tokens) / answer_tokens.clamp(min=1)
    losses, log_odds, ratio = odds_ratio_loss(avg[:n], avg[n:], method.beta)
    nll = -(lp * (rows < n)).sum()
    nll_tokens = batch.get("step_counts", batch["counts"])["nll_tokens"]  # alone, the batch is the whole step
    stats = {"nll_loss": nll.detach() * denominator / nll_tokens, "log_odds_ratio": ratio.sum(),
             "log_odds_chosen": log_odds.sum(),
             **pair_stats(method.beta * avg[:n].detach(), method.beta * avg[n:].detach(), avg[:n], avg[n:])}
    return nll / nll_tokens + losses.sum() / denominator, stats


def collate(examples: list, pad_id: int, packed: bool) -> dict:
    """DPO's batch, plus the chosen rows' NLL tokens (a step count) and, with nll_on_prompt, their answer
    tokens."""
    import torch

    from ..data.collate import collate_preference

    batch = collate_preference(examples, pad_id, packed)
    batch["counts"] = {"nll_tokens": int(batch["completion_mask"][:len(examples), 1:].sum())}
    if "answer_tokens" in examples[0]:
        batch["answer_tokens"] = torch.tensor([e["answer_tokens"] for e in examples])
    return batch


def prepare(cfg, tokenizer, rows):
    examples = encode_rows(tokenizer, rows, cfg.data, "preference")
    if cfg.method.nll_on_prompt:  # every chosen token after the first is counted; the answer's are the last ones
        for e in examples:
            chosen = e["chosen"]
            e["answer_tokens"] = sum(chosen["completion_mask"][1:])
            e["chosen"] = {**chosen, "completion_mask": [1] * len(chosen["input_ids"])}
    return examples, partial(collate, pad_id=tokenizer.pad_token_id, packed=packing(cfg))


def check(cfg) -> None:
    require(cfg.method.beta > 0, "method.beta", cfg.method.beta, "must be > 0")


METHOD = Method("orpo", ORPOMethod, data="preference", head="lm", adapters=tuple(ADAPTERS),
                metrics=("loss", "log_odds_ratio", "nll_loss", "rewards/accuracies", "rewards/margins"),
                prepare=prepare, step=orpo_step, reference=lambda m: False, check=check)
