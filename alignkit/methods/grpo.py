"""GRPO (Shao et al. 2024, DeepSeekMath; TRL 1.16's GRPOTrainer): G completions per prompt, advantages from the
group's rewards, a clipped policy-gradient loss; no value model.

A step: sample train.batch_size prompts x method.num_generations completions (critic_free.rollout: each
prompt prefilled once for its group), score them (reward.*), compute group-normalised advantages, then
method.num_iterations optimizer steps on that one generation (critic_free.update). With beta = 0 (TRL's
default) nothing runs a reference forward; with beta > 0 the k3 KL to the reference (the base with the adapter
off, or with adapter=full a frozen second copy) is added per token.
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from . import critic_free
from .critic_free import CriticFreeMethod, choices
from .record import Method


ScaleRewards = choices("ScaleRewards", "group", "batch", "none")
LossType = choices("LossType", "grpo", "bnpo", "dr_grpo", "dapo")
SamplingLevel = choices("SamplingLevel", "token", "sequence")


@dataclass
class GRPOMethod(CriticFreeMethod):
    scale_rewards: ScaleRewards = MISSING
    loss_type: LossType = MISSING
    importance_sampling_level: SamplingLevel = MISSING
    use_bias_correction_kl: bool = MISSING


def advantages(ctx, rewards, batch: dict):
    """Group-normalised advantages; scale "batch" divides by the std of every process's rewards."""
    from ..objectives.grpo import group_advantages

    m = ctx.cfg.method
    batch_std = critic_free.global_std(rewards, batch["real"]) if m.scale_rewards.value == "batch" else None
    return group_advantages(rewards, m.num_generations, m.scale_rewards.value, batch_std), {}


def grpo_loss(model, mb: dict, counts: dict, method):
    """This micro-batch's share of the step's loss (counts: the step's completions and loss tokens) and sums
    of its metrics (entropy, KL, clipped tokens)."""
    from ..forward.policy import completions_logps
    from ..objectives.grpo import aggregate, clipped_surrogate, importance_ratio, k3

    mask = mb["mask"]
    logp, entropy = completions_logps(model, mb, method.temperature)
    old = mb["old_logp"] if "old_logp" in mb else logp.detach()  # one pass per generation: the ratio is 1
    ratio = importance_ratio(logp, old, mask, method.importance_sampling_level.value)
    eps_high = method.epsilon if method.epsilon_high is None else method.epsilon_high
    per_token, low, high = clipped_surrogate(ratio, mb["advantages"], method.epsilon, eps_high)
    stats = {}
    if method.beta > 0:
        kl = k3(logp, mb["ref_logp"])
        if method.use_bias_correction_kl:
            kl = kl * ratio  # TRL 1.16's default: the unbiased reverse-KL gradient
        per_token = per_token + method.beta * kl
        stats["kl"] = (kl.detach() * mask).sum()
    loss = aggregate(per_token, mask, method.loss_type.value, counts["sequences"], counts["tokens"],
                     method.max_new_tokens)
    per_sequence = ratio.shape[1] == 1  # GSPO: one ratio per completion, clipped ratios counted per completion
    units = mask.any(-1, keepdim=True).float() if per_sequence else mask
    stats.update({"entropy": (entropy * mask).sum(), "clip_ratio/low_mean": (low * units).sum(),
                  "clip_ratio/high_mean": (high * units).sum(), "clip_ratio/region_mean": ((low | high) * units).sum(),
                  "_clip_units": units.sum(), "_tokens": mask.sum()})
    return loss, stats


def loss_counts(method, local: dict, world: dict) -> dict:
    """The loss's denominators: completions and loss tokens of the whole step over every process; for bnpo the
    tokens of this process (its local token mean, averaged over the processes, as TRL does), times the process
    count because each process's share is scaled back by it."""
    from ..session import dist

    tokens = local["tokens"] * dist.world() if method.loss_type.value == "bnpo" else world["tokens"]
    return {"sequences": world["sequences"], "tokens": tokens}


METHOD = Method("grpo", GRPOMethod, data="prompts", head="lm", adapters=critic_free.ADAPTERS,
                metrics=critic_free.METRICS, prepare=critic_free.prepare, step=grpo_loss,
                rollout=critic_free.rollout, reference=lambda m: m.beta > 0,
                update=critic_free.update_with(advantages, loss_counts, old_logps=lambda m: m.num_iterations > 1,
                                               skippable=lambda m: m.beta == 0),
                updates_per_step=lambda m: m.num_iterations, check=critic_free.check, strategies=("ddp",),
                why_not_fsdp=critic_free.WHY_NOT_FSDP, before_training=critic_free.before_training)
