"""RLOO (Ahmadian et al. 2024, "Back to Basics"; TRL 1.16's RLOOTrainer): G completions per prompt, each one's
baseline the mean reward of the other G - 1, the KL to the reference folded into the reward (k1 summed over the
completion, TRL's default beta 0.05), a PPO-clipped ratio per completion; no value model.

Shares the group rollout and the update with GRPO (critic_free.py); only the advantages and the loss differ.
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from . import critic_free
from .critic_free import CriticFreeMethod
from .record import Method


@dataclass
class RLOOMethod(CriticFreeMethod):
    normalize_advantages: bool = MISSING


def padded(completions: list[dict], key: str):
    import torch

    return torch.nn.utils.rnn.pad_sequence([c[key] for c in completions], batch_first=True)


def advantages(ctx, rewards, batch: dict):
    """R' = R - beta * sum_t (log pi_old - log pi_ref) (beta > 0), then the leave-one-out baseline; optionally
    normalised over every process's batch. Metrics: kl (per token, of the completions it was folded from)."""
    import torch

    from ..objectives.grpo import kl_in_reward, leave_one_out_advantages, normalize

    m, completions, extra = ctx.cfg.method, batch["completions"], {}
    if m.beta > 0:
        old, ref = padded(completions, "old_logp"), padded(completions, "ref_logp")
        mask = torch.nn.utils.rnn.pad_sequence(
            [torch.full((len(c["response"]),), float(not (m.mask_truncated_completions and c["truncated"])))
             for c in completions], batch_first=True).to(old)
        rewards = kl_in_reward(rewards.to(old), old, ref, mask, m.beta).cpu()
        s = critic_free.global_sums({"kl": ((old - ref) * mask).sum(), "tokens": mask.sum()}, batch["real"])
        extra["kl"] = s["kl"] / max(s["tokens"], 1.0)
    adv = leave_one_out_advantages(rewards, m.num_generations)
    if m.normalize_advantages:
        s = critic_free.global_sums({"n": len(adv), "s": adv.sum()}, batch["real"])
        adv = normalize(adv, torch.tensor(s["s"] / max(s["n"], 1)), critic_free.global_std(adv, batch["real"]))
    return adv, extra


def rloo_loss(model, mb: dict, counts: dict, method):
    """This micro-batch's share of the mean over the step's completions of the clipped sequence-ratio loss."""
    from ..forward.policy import completions_logps
    from ..objectives.grpo import sequence_surrogate

    mask = mb["mask"]
    logp, entropy = completions_logps(model, mb, method.temperature)
    old = mb["old_logp"] if "old_logp" in mb else logp.detach()  # one pass per generation: the ratio is 1
    eps_high = method.epsilon if method.epsilon_high is None else method.epsilon_high
    loss, low, high = sequence_surrogate(logp, old, mb["advantages"], mask, method.epsilon, eps_high)
    return loss.sum() / counts["sequences"], {
        "entropy": (entropy * mask).sum(), "_tokens": mask.sum(), "clip_ratio/low_mean": low.sum(),
        "clip_ratio/high_mean": high.sum(), "clip_ratio/region_mean": (low | high).sum(), "_clip_units": len(loss)}


METHOD = Method("rloo", RLOOMethod, data="prompts", head="lm", adapters=critic_free.ADAPTERS,
                metrics=critic_free.METRICS, prepare=critic_free.prepare, step=rloo_loss,
                rollout=critic_free.rollout, reference=lambda m: m.beta > 0,
                update=critic_free.update_with(advantages, lambda m, local, world: world,
                                               old_logps=lambda m: m.num_iterations > 1 or m.beta > 0,
                                               skippable=lambda m: True),
                updates_per_step=lambda m: m.num_iterations, check=critic_free.check, strategies=("ddp",),
                why_not_fsdp=critic_free.WHY_NOT_FSDP, before_training=critic_free.before_training)
