"""PPO-RLHF on one base model copy.

policy = base + the trained adapter; reference = the same base with adapters off (adapter=full: a frozen second
copy of the base, optionally int8/nf4: method.ref_quant); value function = a
zero-initialised Linear on the policy's last hidden state (one forward gives log-probs and values, as in
lm-human-preferences); reward = the runner's reward function (a reward-model adapter on the same base, a
separate RM, or a gold judge). Log-probs divide the logits by the sampling temperature in the rollout, the
reference and the update alike.

With several processes (DDP) each rolls out its share of every step's prompts and updates on its own
rollouts through the DDP wrapper: the gradient is the rows-weighted mean of the processes' minibatch
losses; logged numbers are global.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from ..config.schema import SamplingConfig
from ..config.validate import validate_sampling
from ..errors import UsageError, require
from .critic_free import ADAPTERS, WHY_NOT_FSDP, RefQuant, before_training as load_reference, prepare
from .record import Method


class KLEstimator(Enum):
    k1 = "k1"
    k3 = "k3"


@dataclass
class PPOMethod(SamplingConfig):
    name: str = MISSING
    kl_coef: float = MISSING
    kl_estimator: KLEstimator = MISSING
    adaptive_kl: bool = MISSING
    target_kl: float = MISSING
    kl_horizon: float = MISSING
    gamma: float = MISSING
    lam: float = MISSING
    whiten_advantages: bool = MISSING
    clip_range: float = MISSING
    vf_clip: float = MISSING
    vf_coef: float = MISSING
    ppo_epochs: int = MISSING
    num_minibatches: int = MISSING
    missing_eos_penalty: Optional[float] = MISSING
    ref_quant: RefQuant = MISSING
    sample_every: int = MISSING


def rollout(ctx, examples: list) -> dict:
    """Sample completions, score them, and compute old log-probs, values, reference log-probs, rewards."""
    import torch

    from ..forward.policy import response_forward
    from ..forward.precision import autocast
    from ..forward.reference import reference_of
    from ..generation.sample import sample_responses, sampling_config
    from ..objectives.ppo import kl_penalty, masked_mean, token_rewards
    from ..scoring.functions import sequence_scores

    m, device = ctx.cfg.method, ctx.device
    started = time.perf_counter()
    ids, attn, mask, has_eos = sample_responses(ctx.model, ctx.tokenizer, [e["prompt_ids"] for e in examples],
                                                sampling_config(ctx.tokenizer, m), device)
    gen_seconds = time.perf_counter() - started
    n = mask.shape[1]
    with torch.no_grad(), autocast(ctx.cfg.train.precision.value, device):
        logp, values, entropy = response_forward(ctx.model, ids, attn, n, m.temperature, values=True)
        with reference_of(ctx.model, ctx.reference) as reference:
            ref_logp = response_forward(reference, ids, attn, n, m.temperature)[0]
    texts = [ctx.tokenizer.decode(r[k == 1], skip_special_tokens=True) for r, k in zip(ids[:, -n:], mask)]
    scores = sequence_scores(ctx.reward([e["row"] for e in examples], texts), ctx.cfg.reward.weights).to(device)
    if m.missing_eos_penalty is not None:
        scores = scores - m.missing_eos_penalty * (~has_eos).float()
    maskf = mask.float()
    kl = kl_penalty(logp, ref_logp, m.kl_estimator.value) * maskf
    kl_coef = ctx.state["kl_coef"]
    per_seq_kl = kl.sum(-1)
    non_score = -kl_coef * per_seq_kl
    metrics = {"objective/kl": float(per_seq_kl.mean()),
               "objective/entropy": float((entropy * maskf).sum(-1).mean()),
               "objective/non_score_reward": float(non_score.mean()),
               "objective/scores": float(scores.mean()),
               "objective/rlhf_reward": float((scores + non_score).mean()),
               "val/mean": float(masked_mean(values * maskf, maskf)),
               "response_length": float(maskf.sum(-1).mean()),
               "eos_fraction": float(has_eos.float().mean()),
               "kl_coef": kl_coef,
               "gen_tokens_per_s": float(mask.sum()) / gen_seconds}
    samples = [{"prompt": e["row"]["prompt"], "completion": t, "score": s}
               for e, t, s in zip(examples, texts, scores.tolist())]
    return {"ids": ids, "attn": attn, "mask": maskf, "logp": logp * maskf, "values": values * maskf,
            "rewards": token_rewards(scores, kl, kl_coef, maskf), "metrics": metrics, "samples": samples,
            "tokens": float(attn.sum()) * m.ppo_epochs}


def minibatch_loss(model, mb: dict, denominator: int, method):
    """The clipped policy + value loss of one minibatch (token means; denominator is 1) and its stats."""
    from ..forward.policy import response_forward
    from ..objectives.ppo import policy_loss, value_loss

    logp, values, _ = response_forward(model, mb["ids"], mb["attn"], mb["mask"].shape[1], method.temperature,
                                       values=True)
    pg, clipfrac, approxkl = policy_loss(logp, mb["logp"], mb["advantages"], mb["mask"], method.clip_range)
    vf, vf_clipfrac = value_loss(values, mb["values"], mb["returns"], mb["mask"], method.vf_clip)
    loss = (pg + method.vf_coef * vf) / denominator
    return loss, {"loss": loss, "loss/policy": pg, "loss/value": vf, "policy/clipfrac": clipfrac,
                  "policy/approxkl": approxkl, "val/clipfrac": vf_clipfrac}


def update(ctx, batch: dict, session, rows: int) -> dict:
    """method.ppo_epochs passes of method.num_minibatches clipped updates over one rollout batch
    (session.loops.minibatch_updates: every row in every pass), then the adaptive KL controller moves the
    coefficient. rows: this process's real rollouts (0 for a stand-in)."""
    import torch

    from ..objectives.ppo import adaptive_kl_coef, gae, whiten
    from ..session import dist
    from ..session.loops import minibatch_updates

    m, t = ctx.cfg.method, ctx.cfg.train
    mask = batch["mask"]
    advantages, returns = gae(batch["rewards"], batch["values"], mask, m.gamma, m.lam)
    if m.whiten_advantages:
        advantages = whiten(advantages, mask)
    generator = torch.Generator().manual_seed(t.seed * 100003 + ctx.step)  # minibatch order = f(seed, step)
    rows_tensors = {"ids": batch["ids"], "attn": batch["attn"], "logp": batch["logp"], "values": batch["values"],
                    "advantages": advantages, "returns": returns, "mask": mask}
    stats, ok = minibatch_updates(session, ctx.forward, rows_tensors, rows, m.ppo_epochs, m.num_minibatches,
                                  generator, t.precision.value, ctx.device)
    if m.adaptive_kl and ok:  # a skipped step's NaN KL must not poison the coefficient
        kl = dist.all_mean({"kl": batch["metrics"]["objective/kl"]}, rows)["kl"]
        episodes = dist.all_sum({"rows": rows})["rows"]
        ctx.state["kl_coef"] = adaptive_kl_coef(ctx.state["kl_coef"], kl, m.target_kl, m.kl_horizon, episodes)
    return stats


def finish(model, final: Path) -> None:
    """final/value_head.safetensors: the value head, next to the policy adapter."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.v_head.state_dict().items()},
              final / "value_head.safetensors")


def check(cfg) -> None:
    m, t = cfg.method, cfg.train
    for key in ("kl_coef", "clip_range", "vf_clip", "vf_coef", "target_kl", "kl_horizon"):
        require(m[key] >= 0 if key == "kl_coef" else m[key] > 0, f"method.{key}", m[key], "must be > 0")
    require(0 <= m.gamma <= 1 and 0 <= m.lam <= 1, "method.gamma/lam", f"{m.gamma}/{m.lam}", "must be in [0, 1]")
    validate_sampling(m, "method", greedy=False)
    for key in ("ppo_epochs", "num_minibatches", "sample_every"):
        require(m[key] >= 1, f"method.{key}", m[key], "must be >= 1")
    require(m.num_minibatches <= t.batch_size, "method.num_minibatches", m.num_minibatches,
            f"must be <= train.batch_size={t.batch_size} (rollouts per step)")
    if m.ref_quant.value != "none" and cfg.adapter.name != "full":
        raise UsageError(f"method.ref_quant={m.ref_quant.value} quantises the frozen reference copy, which only "
                         f"adapter=full loads (other adapters' reference is the base with the adapter off): drop it")


def before_training(run) -> None:
    """adapter=full: the reference is a frozen copy of the base (said in the log); other adapters switch off."""
    load_reference(run, "kl_coef")


METHOD = Method("ppo", PPOMethod, data="prompts", head="lm+value", adapters=ADAPTERS,
                metrics=("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy", "loss/value"),
                prepare=prepare, step=minibatch_loss, rollout=rollout, update=update, check=check, finish=finish,
                before_training=before_training,
                strategies=("ddp",), why_not_fsdp=WHY_NOT_FSDP, state=lambda m: {"kl_coef": m.kl_coef})
