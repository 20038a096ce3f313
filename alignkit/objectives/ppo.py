"""PPO-RLHF pieces as pure functions of (B, T) tensors with a 0/1 response mask.

Conventions: logp/ref_logp/values/mask are aligned per response token; padding
positions carry mask 0 and are ignored by every reduction.
"""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries (needs >= 2 of them)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over masked entries; shift_mean=False adds the mean back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of policy vs reference on sampled tokens.

    k1 = logp - ref_logp (unbiased, can be negative); k3 = (r - 1) - log r with
    r = exp(ref_logp - logp) (unbiased, always >= 0, lower variance; Schulman).
    """
    k1 = logp - ref_logp
    if estimator == "k1":
        return k1
    if estimator == "k3":
        return torch.expm1(-k1) + k1
    raise ValueError(f"unknown KL estimator {estimator!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """r_t = -kl_coef * kl_t, plus the sequence score on the last real response token (not one past it)."""
    rewards = -kl_coef * kl * mask
    last = (mask.cumsum(-1) * mask).argmax(-1)  # index of the last 1 in each row
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation, right to left; V beyond the last valid token is 0.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns = A + V.
    Returns (advantages, returns), both zero on padding.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # a padded position passes nothing back: the next valid step sees V = 0, A = 0
        next_value = values[:, t] * m
        next_adv = adv * m
    return advantages, (advantages + values) * mask


def policy_loss(logp, old_logp, advantages, mask, clip_range: float):
    """Clipped surrogate: mean(max(-A r, -A clip(r, 1-e, 1+e))); returns (loss, clipfrac, approxkl)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approxkl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return loss, clipfrac.detach(), approxkl.detach()


def value_loss(values, old_values, returns, mask, clip_range: float):
    """0.5 mean(max((V - R)^2, (clip(V, V_old +- e) - R)^2)); returns (loss, clipfrac)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: float, n: int) -> float:
    """Ziegler et al.: e = clip(kl / target - 1, -0.2, 0.2); coef *= 1 + e * n / horizon."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return coef * (1 + error * n / horizon)
