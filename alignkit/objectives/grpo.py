"""Critic-free policy gradients (GRPO, RLOO) as pure functions of tensors.

Rows are completions, grouped: rows g*G .. g*G + G-1 answer the same prompt (G = num_generations).
Per-token tensors are (N, T) with a 0/1 completion mask; rewards and advantages are (N,). NaN marks a reward
that is missing (a reward function returned None for that completion), as in TRL 1.16.
"""
from __future__ import annotations

import torch

STD_EPS = 1e-4  # TRL's: advantages = (R - mean) / (std + 1e-4)


def combine_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """R = sum_k w_k r_k over the functions that scored each completion (NaN = left out: nansum); a completion
    that no function scored stays NaN. per_function (N, K), weights (K,) -> (N,)."""
    total = (per_function * weights.to(per_function)).nansum(-1)
    return total.masked_fill(per_function.isnan().all(-1), float("nan"))


def nan_std(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Unbiased standard deviation over the non-NaN entries (NaN with fewer than two)."""
    mean = x.nanmean(dim=dim, keepdim=True)
    count = (~x.isnan()).sum(dim=dim, keepdim=True)
    var = ((x - mean) ** 2).nansum(dim=dim, keepdim=True) / (count - 1).clamp(min=1)
    std = var.sqrt().masked_fill(count < 2, float("nan"))
    return std.squeeze(dim) if dim is not None else std.reshape(())


def group_std(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """Each completion's group standard deviation, (N,)."""
    return nan_std(rewards.view(-1, group), dim=1).repeat_interleave(group)


def group_advantages(rewards: torch.Tensor, group: int, scale: str, batch_std: torch.Tensor | None = None):
    """GRPO: A = R - mean of its group, divided by (std + 1e-4) of its group (scale "group"), of the whole batch
    ("batch"; batch_std: the std over every process's rewards, default this batch's), or not at all ("none", Dr.
    GRPO). A missing reward (NaN) gets A = 0 and is left out of its group's mean and std."""
    mean = rewards.view(-1, group).nanmean(1).repeat_interleave(group)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std(rewards, group) + STD_EPS)
    elif scale == "batch":
        advantages = advantages / ((nan_std(rewards) if batch_std is None else batch_std) + STD_EPS)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return advantages.nan_to_num(nan=0.0)


def kl_in_reward(rewards: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                 beta: float) -> torch.Tensor:
    """RLOO: R' = R - beta * sum_t (log pi_old - log pi_ref) (k1, summed over the completion's tokens)."""
    return rewards - beta * ((old_logp - ref_logp) * mask).sum(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO: A_i = R_i - mean of the other scored completions of its group; NaN (missing, or no other) -> 0."""
    grouped = rewards.view(-1, group)
    scored = (~grouped.isnan()).sum(1, keepdim=True)
    baseline = (grouped.nansum(1, keepdim=True) - grouped) / (scored - 1)
    return (grouped - baseline).reshape(-1).nan_to_num(nan=0.0)


def normalize(advantages: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(A - mean) / (std + 1e-4): RLOO's normalize_advantages, with the batch's mean and std."""
    return (advantages - mean) / (std + STD_EPS)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || ref) per token: e^(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """pi / pi_old per token (N, T) (level "token"), or per completion (N, 1) from the mean log-ratio over its
    tokens (level "sequence", GSPO)."""
    log_ratio = logp - old_logp
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        return torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))
    raise ValueError(f"unknown importance_sampling_level {level!r}")


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float):
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) and where the clip binds: (loss, low, high), each
    broadcast like ratio; advantages (N,). low: r < 1 - eps_low with A < 0; high: r > 1 + eps_high with A > 0."""
    a = advantages.unsqueeze(-1) if ratio.dim() == 2 else advantages
    loss = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    return loss, (ratio < 1 - eps_low) & (a < 0), (ratio > 1 + eps_high) & (a > 0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, sequences: float, tokens: float,
              max_tokens: int) -> torch.Tensor:
    """This chunk's share of the step's loss (N, T) -> scalar, by TRL 1.16's loss_type:

    grpo:  each completion's token mean, summed, / `sequences`   (a mean over completions)
    bnpo, dapo: token sum / `tokens`                             (a token mean)
    dr_grpo: token sum / (`sequences` x `max_tokens`)            (a constant denominator)

    sequences and tokens are the counts of the whole step (every chunk; for dapo every process), so the chunks'
    shares add up to the step's loss whatever the chunking."""
    summed = per_token * mask
    if loss_type == "grpo":
        return (summed.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / sequences
    if loss_type in ("bnpo", "dapo"):
        return summed.sum() / max(tokens, 1.0)
    if loss_type == "dr_grpo":
        return summed.sum() / (sequences * max_tokens)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def sequence_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       eps_low: float, eps_high: float):
    """RLOO's per-completion loss: r = exp(sum_t log pi - sum_t log pi_old), clipped as PPO; (N,) each of
    (loss, low clipped, high clipped)."""
    ratio = torch.exp(((logp - old_logp) * mask).sum(-1))
    return clipped_surrogate(ratio, advantages, eps_low, eps_high)
