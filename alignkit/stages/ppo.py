"""PPO-RLHF stage on one base model copy.

policy = base + the trained adapter; reference = the same base with adapters off;
value function = a zero-initialised Linear on the policy's last hidden state (one
forward gives log-probs and values, as in lm-human-preferences); reward = a
reward-model adapter on the same base, a separate RM, or a gold judge
(ppo_reward.py). Log-probs divide the logits by the sampling temperature in the
rollout, the reference and the update alike.

With several processes (DDP) each rolls out its share of every step's prompts (sampling
seeded by its rank) and updates on its own rollouts through the DDP wrapper: the gradient
is the rows-weighted mean of the processes' minibatch losses; logged numbers are global.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import get_scheduler

from ..adapters.prompt import virtual_token_inputs
from ..data.tokenize import encode_prompt
from ..errors import UsageError
from ..eval.sample import generation_config, left_pad
from ..objectives import token_logps
from ..objectives.ppo import (adaptive_kl_coef, gae, kl_penalty, masked_mean, policy_loss, token_rewards,
                              value_loss, whiten)
from . import dist
from .checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from .common import autocast, make_optimizer
from .faults import catch_sigint, count_step, new_counts, stop_if_interrupted
from .loop import log_file, micro_batches, optimizer_step, resume_point
from .progress import progress_bar
from .resources import peak_memory_mb
from .rundir import truncate_jsonl


def encode_prompts(tokenizer, rows, data, max_new_tokens: int) -> list[dict]:
    """Prompt-only rows -> {"prompt_ids", "row"}; long prompts keep their last tokens."""
    keep = min(data.max_prompt_length or data.max_length, data.max_length - max_new_tokens)
    if keep < 1:
        raise UsageError(f"data.max_length={data.max_length} leaves no room for a prompt before "
                         f"method.max_new_tokens={max_new_tokens}")
    out = []
    for where, row in rows:
        if row.get("prompt") is None:
            raise UsageError(f"{where}: a PPO row needs a 'prompt' (found: {', '.join(row) or 'nothing'})")
        out.append({"prompt_ids": encode_prompt(tokenizer, row["prompt"])[-keep:], "row": row})
    return out


def prepare(cfg, tokenizer, rows):
    return encode_prompts(tokenizer, rows, cfg.data, cfg.method.max_new_tokens), None, None


def add_value_head(model, device) -> torch.nn.Linear:
    """V(s) = w . h(s), zero-initialised so the first advantages are plain returns."""
    head = torch.nn.Linear(model.config.hidden_size, 1, bias=True).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model.v_head = head  # a submodule: trained, checkpointed and restored with the adapter
    return head


def forward_policy(model, ids, attn, n_resp: int, temperature: float, values: bool = True):
    """(log-probs, values, entropy) of the last n_resp tokens, each (B, n_resp).

    Counted from the end, so prompt tuning's soft tokens at the front change nothing; positions
    follow the (virtual-token-extended) attention mask, as generate numbered them.
    """
    module, inputs, _ = virtual_token_inputs(model, ids, attn)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    width = inputs["inputs_embeds"].shape[1] if "inputs_embeds" in inputs else ids.shape[1]
    out = module(**inputs, position_ids=positions[:, -width:], output_hidden_states=values,
                 logits_to_keep=n_resp + 1)
    logits = out.logits[:, :-1].float() / temperature
    logp = token_logps(logits, ids[:, -n_resp:])
    value = None
    if values:
        hidden = out.hidden_states[-1][:, -(n_resp + 1):-1]
        value = model.v_head(hidden.to(model.v_head.weight.dtype)).squeeze(-1).float()
    with torch.no_grad():
        probs = logits.softmax(-1)
        entropy = torch.logsumexp(logits, -1) - (probs * logits).sum(-1)
    return logp, value, entropy


def response_mask(resp: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS (pads after it are 0); and whether each row has an EOS."""
    is_eos = resp == eos_id
    after_first = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_first).long(), is_eos.any(-1)


def sample_responses(model, tokenizer, prompts: list[list[int]], gen, device):
    """Sampled completions of token-id prompts: (ids, attention, response mask, has EOS).

    ids = left-padded prompt + response, pads after the first EOS; the mask covers the last n columns.
    """
    ids, attn = left_pad(prompts, tokenizer.pad_token_id, device)
    with torch.no_grad():
        module, inputs, _ = virtual_token_inputs(model, ids, attn)  # prompt/prefix adapters' virtual tokens
        seqs = module.generate(**inputs, generation_config=gen)
    resp = seqs[:, ids.shape[1]:] if "input_ids" in inputs else seqs  # from embeddings: new tokens only
    mask, has_eos = response_mask(resp, tokenizer.eos_token_id)
    resp = resp.masked_fill(mask == 0, tokenizer.pad_token_id)
    return torch.cat([ids, resp], 1), torch.cat([attn, mask], 1), mask, has_eos


def rollout(model, tokenizer, examples, reward_fn, m, precision: str, device, kl_coef: float) -> dict:
    """Sample completions, score them, and compute old log-probs, values, reference log-probs, rewards."""
    t0 = time.perf_counter()
    gen = generation_config(tokenizer, m.max_new_tokens, m.temperature, m.top_k, m.top_p)
    full_ids, full_attn, mask, has_eos = sample_responses(model, tokenizer, [e["prompt_ids"] for e in examples],
                                                          gen, device)
    gen_seconds = time.perf_counter() - t0
    n = mask.shape[1]
    resp = full_ids[:, -n:]
    with torch.no_grad(), autocast(precision, device):
        logp, values, entropy = forward_policy(model, full_ids, full_attn, n, m.temperature)
        with model.disable_adapter():
            ref_logp = forward_policy(model, full_ids, full_attn, n, m.temperature, values=False)[0]
    texts = [tokenizer.decode(r[k == 1], skip_special_tokens=True) for r, k in zip(resp, mask)]
    scores = reward_fn([e["row"] for e in examples], texts).to(device).float()
    if m.missing_eos_penalty is not None:
        scores = scores - m.missing_eos_penalty * (~has_eos).float()
    maskf = mask.float()
    kl = kl_penalty(logp, ref_logp, m.kl_estimator.value) * maskf
    rewards = token_rewards(scores, kl, kl_coef, maskf)
    return {"ids": full_ids, "attn": full_attn, "mask": maskf, "logp": logp * maskf, "values": values * maskf,
            "rewards": rewards, "scores": scores, "kl": kl, "entropy": entropy * maskf, "texts": texts,
            "gen_tokens_per_s": float(mask.sum()) / gen_seconds, "eos": has_eos.float()}


def minibatch_loss(model, mb: dict, denominator: int, method):
    """The clipped policy + value loss of one minibatch (token means; denominator is 1) and its stats."""
    logp, values, _ = forward_policy(model, mb["ids"], mb["attn"], mb["mask"].shape[1], method.temperature)
    pg, clipfrac, approxkl = policy_loss(logp, mb["logp"], mb["advantages"], mb["mask"], method.clip_range)
    vf, vf_clipfrac = value_loss(values, mb["values"], mb["returns"], mb["mask"], method.vf_clip)
    loss = (pg + method.vf_coef * vf) / denominator
    return loss, {"loss": loss, "loss/policy": pg, "loss/value": vf, "policy/clipfrac": clipfrac,
                  "policy/approxkl": approxkl, "val/clipfrac": vf_clipfrac}


def ppo_update(forward, batch: dict, optimizer, scheduler, params, cfg, device, generator,
               rows: int) -> tuple[dict, bool]:
    """method.ppo_epochs passes of num_minibatches clipped updates over one rollout batch.

    forward: dist.wrap(model, minibatch_loss); rows: this process's real rollouts (0 for a stand-in),
    which weight its loss and stats against the other processes'. Returns the mean stats of the
    updates that ran and whether all ran (NaN/inf ones are skipped)."""
    m, t = cfg.method, cfg.train
    mask = batch["mask"]
    advantages, returns = gae(batch["rewards"], batch["values"], mask, m.gamma, m.lam)
    if m.whiten_advantages:
        advantages = whiten(advantages, mask)
    size = len(mask) // m.num_minibatches
    scale = dist.world() * rows / dist.all_sum({"rows": rows})["rows"]  # DDP averages: 1 with equal shares
    stats: dict[str, float] = defaultdict(float)
    updates = skipped = 0
    for _ in range(m.ppo_epochs):
        order = torch.randperm(len(mask), generator=generator).to(device)
        for k in range(m.num_minibatches):
            idx = order[k * size:(k + 1) * size]
            mb = {"ids": batch["ids"][idx], "attn": batch["attn"][idx], "logp": batch["logp"][idx],
                  "values": batch["values"][idx], "advantages": advantages[idx], "returns": returns[idx],
                  "mask": mask[idx]}
            with autocast(t.precision.value, device):
                loss, mb_stats = forward(mb, 1)
            (loss * scale).backward()
            lr = scheduler.get_last_lr()[0]
            mb_stats = dist.all_mean({k: float(v.detach()) for k, v in mb_stats.items()}, rows)
            grad_norm, ok = optimizer_step(optimizer, scheduler, params, t.max_grad_norm, mb_stats["loss"])
            skipped += not ok
            if not ok:
                continue
            for key, value in mb_stats.items():
                stats[key] += value
            stats["grad_norm"] += grad_norm
            stats["lr"] += lr
            updates += 1
    return {k: v / max(updates, 1) for k, v in stats.items()}, skipped == 0


def rollout_metrics(batch: dict, kl_coef: float) -> dict:
    per_seq_kl = batch["kl"].sum(-1)
    non_score = -kl_coef * per_seq_kl
    return {
        "objective/kl": float(per_seq_kl.mean()),
        "objective/entropy": float(batch["entropy"].sum(-1).mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/scores": float(batch["scores"].mean()),
        "objective/rlhf_reward": float((batch["scores"] + non_score).mean()),
        "val/mean": float(masked_mean(batch["values"], batch["mask"])),
        "response_length": float(batch["mask"].sum(-1).mean()),
        "eos_fraction": float(batch["eos"].mean()),
        "kl_coef": kl_coef,
        "gen_tokens_per_s": batch["gen_tokens_per_s"],
    }


def train_ppo(cfg, model, tokenizer, examples: list, reward_fn, run_dir: Path, device) -> dict:
    """PPO steps (one rollout batch of train.batch_size prompts each); returns the final metrics."""
    m, t = cfg.method, cfg.train
    add_value_head(model, device)
    forward = dist.wrap(model, partial(minibatch_loss, method=m), t.strategy.value, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(t.optimizer.value, params, t.lr, t.weight_decay, device)
    rank, world = dist.rank(), dist.world()
    per_epoch = -(-len(examples) // (t.batch_size * world))
    total = t.max_steps if t.max_steps > 0 else per_epoch * t.epochs
    updates_per_step = m.ppo_epochs * m.num_minibatches
    scheduler = get_scheduler(t.schedule.value, optimizer, num_training_steps=total * updates_per_step,
                              num_warmup_steps=int(t.warmup_ratio * total * updates_per_step))
    start, kl_coef, counts = 0, m.kl_coef, new_counts()
    resume_from = resume_point(cfg, run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        start, kl_coef = state["step"], state["kl_coef"]
        counts = {k: state.get(k, 0) for k in counts}
    if cfg.run.resume is not False and dist.is_main():
        for log in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(run_dir / log, start)
    if world > 1:  # each process samples its own completions: RNG = f(seed, rank, step resumed at)
        torch.manual_seed(t.seed + 1_000_003 * rank + start)

    def save(done: int, epoch: int) -> Path:
        path = run_dir / "checkpoints" / f"step-{done}"
        save_checkpoint(path, model, optimizer, scheduler, done, {"epoch": epoch, "kl_coef": kl_coef, **counts})
        if dist.is_main():
            prune_checkpoints(run_dir, t.keep_checkpoints)
        return path

    generator = torch.Generator().manual_seed(t.seed)
    last: dict = {}
    model.train()  # dropout is off; bitsandbytes' CPU eval-mode kernel would differ from the update's
    with catch_sigint() as sigint, progress_bar(total, start, shown=dist.is_main()) as bar, \
            log_file(run_dir / "metrics.jsonl") as metrics_file, log_file(run_dir / "samples.jsonl") as samples_file:
        for step in range(start, total):
            t0 = time.perf_counter()
            epoch = step // per_epoch
            prompts = micro_batches(examples, t.batch_size * world, t.seed, epoch, t.shuffle)[step % per_epoch]
            batch_examples, rows = dist.share(prompts, rank, world)
            generator.manual_seed(t.seed * 100003 + step)  # minibatch order = f(seed, step): exact resume
            batch = rollout(model, tokenizer, batch_examples, reward_fn, m, t.precision.value, device, kl_coef)
            stats, ok = ppo_update(forward, batch, optimizer, scheduler, params, cfg, device, generator, rows)
            count_step(counts, ok, step + 1, t.max_bad_steps, run_dir)
            metrics = rollout_metrics(batch, kl_coef)
            elapsed = time.perf_counter() - t0
            real = 1.0 if rows else 0.0  # a stand-in's throughput does not count
            rates = dist.all_sum({"gen_tokens_per_s": metrics.pop("gen_tokens_per_s") * real,
                                  "tokens_per_s": float(batch["attn"].sum()) * updates_per_step / elapsed * real,
                                  "samples_per_s": rows / elapsed})
            last = {"step": step + 1, "epoch": round((step + 1) / per_epoch, 4), **dist.all_mean(metrics, rows),
                    **stats, "skipped_steps": counts["skipped_steps"], **rates}
            if m.adaptive_kl and ok:  # a skipped step's NaN KL must not poison the coefficient
                kl_coef = adaptive_kl_coef(kl_coef, last["objective/kl"], m.target_kl, m.kl_horizon, len(prompts))
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
            if step % m.sample_every == 0:
                for e, text, score in list(zip(batch_examples, batch["texts"], batch["scores"].tolist()))[:4]:
                    samples_file.write(json.dumps({"step": step + 1, "prompt": e["row"]["prompt"],
                                                   "completion": text, "score": score}, ensure_ascii=False) + "\n")
                samples_file.flush()
            bar.update(step + 1, last["objective/scores"])
            done, saved = step + 1, None
            if t.save_every and done % t.save_every == 0 and done < total:
                saved = save(done, epoch)
            if done < total:  # every process stops at the same step, even if Ctrl-C reached only some
                stop_if_interrupted({"hit": dist.any_rank(sigint["hit"])}, run_dir, done,
                                    lambda: saved or save(done, epoch))
    return {**last, "train_steps": total - start, **peak_memory_mb(device)}


def save_value_head(model, final: Path) -> None:
    """final/value_head.safetensors: the value head, next to the policy adapter."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.v_head.state_dict().items()},
              final / "value_head.safetensors")
