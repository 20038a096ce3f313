"""What GRPO and RLOO share: the group rollout (dynamic sampling included), the step's update, the checks.

rollout: this process's prompts, each sampled method.num_generations times (generation/decode.py: one prefill per
group), in chunks of method.micro_batch_size completions; decoded and scored (reward.*). With
method.dynamic_sampling, groups whose rewards all agree (no gradient) are dropped and more prompts drawn (a
function of the seed, step, process and draw, so a resumed run draws the same) until the batch is full or
method.max_resamples draws were made.

update: old log-probs (only when a later pass needs them: num_iterations > 1, or RLOO's KL in the reward) and
reference log-probs (beta > 0) without gradient, the method's advantages, then num_iterations optimizer steps,
each over every completion in micro-batches (a completion whose advantage is exactly 0 and whose loss has no KL
term adds nothing and is skipped). Losses are shares of the step's loss over counts of the whole step (every
micro-batch, every process), so the chunking changes nothing; metrics are global.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from omegaconf import MISSING

from ..config.schema import SamplingConfig
from ..config.validate import validate_sampling
from ..data.tokenize import encode_prompts
from ..errors import UsageError, require

ADAPTERS = ("prompt", "prefix", "lora", "qlora", "vera", "loha", "lokr", "ia3", "full")  # online methods: all but bitdelta
METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio")
WHY_NOT_FSDP = "rollouts generate on each process alone, which sharded weights do not allow"


def choices(name: str, *values: str) -> type[Enum]:
    """An Enum of a config key's choices, each member named as its value (the YAML's string)."""
    return Enum(name, {v: v for v in values}, module=__name__)


RefQuant = choices("RefQuant", "none", "int8", "nf4")  # method.ref_quant


@dataclass
class CriticFreeMethod(SamplingConfig):
    name: str = MISSING
    num_generations: int = MISSING
    micro_batch_size: Optional[int] = MISSING
    beta: float = MISSING
    ref_quant: RefQuant = MISSING
    epsilon: float = MISSING
    epsilon_high: Optional[float] = MISSING
    num_iterations: int = MISSING
    mask_truncated_completions: bool = MISSING
    dynamic_sampling: bool = MISSING
    max_resamples: int = MISSING
    sample_every: int = MISSING


def prepare(cfg, tokenizer, rows):
    return encode_prompts(tokenizer, rows, cfg.data, cfg.method.max_new_tokens), None


def generate(ctx, examples: list) -> list[dict]:
    """G sampled completions per example, in chunks of micro_batch_size completions: one dict each."""
    from ..generation.merge import merged
    from ..generation.sample import sample_responses, sampling_config

    m, tok = ctx.cfg.method, ctx.tokenizer
    per_chunk = max(1, (m.micro_batch_size or len(examples) * m.num_generations) // m.num_generations)
    gen, out = sampling_config(tok, m), []
    with merged(ctx.model, gen.merge):  # once for every chunk
        for i in range(0, len(examples), per_chunk):
            chunk = examples[i:i + per_chunk]
            ids, _, mask, has_eos = sample_responses(ctx.model, tok, [e["prompt_ids"] for e in chunk], gen,
                                                     ctx.device, m.num_generations)
            resp = ids[:, ids.shape[1] - mask.shape[1]:]
            for j in range(len(chunk) * m.num_generations):
                e, tokens = chunk[j // m.num_generations], resp[j][mask[j] == 1].tolist()
                out.append({"prompt": e["prompt_ids"], "response": tokens, "truncated": not bool(has_eos[j]),
                            "row": e["row"], "text": tok.decode(tokens, skip_special_tokens=True)})
    return out


def score(ctx, completions: list[dict]):
    """(reward names, (N, K) rewards, NaN where a function gave None)."""
    import torch

    out = ctx.reward([c["row"] for c in completions], [c["text"] for c in completions],
                     completion_ids=[c["response"] for c in completions])
    if isinstance(out, dict):
        return list(out), torch.stack([v.float().cpu() for v in out.values()], 1)
    return [ctx.cfg.reward.kind.value], torch.as_tensor(out).float().cpu().reshape(-1, 1)


def weights(ctx, names: list[str]):
    import torch

    given = ctx.cfg.reward.weights
    return torch.tensor(list(given) if given is not None and len(given) == len(names) else [1.0] * len(names))


def tied_groups(ctx, columns) -> list[bool]:
    """Per group: do its rewards all agree (std 0, or fewer than two scored)? Such a group has no gradient."""
    from ..objectives.grpo import combine_rewards, nan_std

    rewards = combine_rewards(columns, weights(ctx, [None] * columns.shape[1])).view(-1, ctx.cfg.method.num_generations)
    std = nan_std(rewards, dim=1)
    return (std.isnan() | (std == 0)).tolist()


def extra_prompts(ctx, n: int, draw: int) -> list:
    """n more training prompts for dynamic sampling: a function of (seed, step, process, draw)."""
    import torch

    from ..session import dist

    seed = ((ctx.cfg.train.seed * 1_000_003 + ctx.step) * 1_009 + draw) * 101 + dist.rank()
    picked = torch.randint(len(ctx.prompts), (n,), generator=torch.Generator().manual_seed(seed))
    return [ctx.prompts[i] for i in picked.tolist()]


def rollout(ctx, examples: list) -> dict:
    import torch

    m, group = ctx.cfg.method, ctx.cfg.method.num_generations
    spent = {"seconds": 0.0, "tokens": 0}  # every draw's sampling, for gen_tokens_per_s

    def draw(batch: list) -> list[dict]:
        started = time.perf_counter()
        out = generate(ctx, batch)
        spent["seconds"] += time.perf_counter() - started
        spent["tokens"] += sum(len(c["response"]) for c in out)
        return out

    completions = draw(examples)
    names, columns = score(ctx, completions)
    first = {"completions": completions, "columns": columns}  # the step's own prompts: what the metrics show
    dropped = draws = 0
    if m.dynamic_sampling:
        kept, kept_columns = [], []
        while True:
            for g, tied in enumerate(tied_groups(ctx, columns)):
                if tied:
                    dropped += 1
                elif len(kept) < len(examples) * group:
                    kept += completions[g * group:(g + 1) * group]
                    kept_columns.append(columns[g * group:(g + 1) * group])
            missing = len(examples) - len(kept) // group
            if missing == 0 or draws == m.max_resamples:
                break
            draws += 1
            completions = draw(extra_prompts(ctx, missing, draws))
            columns = score(ctx, completions)[1]
        if kept:  # else no group had a gradient: keep the step's own (the step changes nothing but the moments)
            completions, columns = kept, torch.cat(kept_columns)
        else:
            completions, columns = first["completions"], first["columns"]
    metrics = {"gen_tokens_per_s": spent["tokens"] / max(spent["seconds"], 1e-9), "time/generation": spent["seconds"]}
    if m.dynamic_sampling:
        metrics.update({"dynamic_sampling/dropped_groups": float(dropped), "dynamic_sampling/draws": float(draws),
                        "dynamic_sampling/kept_groups": float(len(completions) // group)})
    return {"completions": completions, "columns": columns, "names": names, "first": first, "metrics": metrics,
            "samples": [{"prompt": c["row"]["prompt"], "completion": c["text"]} for c in completions[:4]],
            "tokens": float(sum(len(c["prompt"]) + len(c["response"]) for c in completions)) * m.num_iterations}


def micro_batch(ctx, chunk: list[dict]) -> dict:
    """Tensors of some completions (forward/policy.completions_logps's layout): their distinct prompts once
    (left-padded), each completion's prompt index, the completions (right-padded), the loss mask (0 on a
    truncated one when masked), advantages, and the old/reference log-probs they carry (right-padded with 0)."""
    import torch

    from ..generation.sample import left_pad

    pad, device = ctx.tokenizer.pad_token_id, ctx.device
    index: dict[tuple, int] = {}
    owner = [index.setdefault(tuple(c["prompt"]), len(index)) for c in chunk]
    prompt_ids, prompt_attn = left_pad([list(p) for p in index], pad, device)
    resp, resp_mask = (t.flip(1) for t in left_pad([c["response"][::-1] for c in chunk], pad, device))  # right-padded
    loss_mask = resp_mask.float()
    if ctx.cfg.method.mask_truncated_completions:
        loss_mask = loss_mask * torch.tensor([not c["truncated"] for c in chunk], device=device).unsqueeze(1)
    mb = {"prompt_ids": prompt_ids, "prompt_attn": prompt_attn, "owner": torch.tensor(owner, device=device),
          "resp": resp, "resp_mask": resp_mask, "mask": loss_mask, "shared": not ctx.cfg.train.gradient_checkpointing,
          "advantages": torch.tensor([c.get("advantage", 0.0) for c in chunk], device=device)}
    for key in ("old_logp", "ref_logp"):
        if key in chunk[0]:
            mb[key] = torch.nn.utils.rnn.pad_sequence([c[key] for c in chunk], batch_first=True)
    return mb


def chunks(ctx, completions: list) -> list[list]:
    size = ctx.cfg.method.micro_batch_size or len(completions)
    return [completions[i:i + size] for i in range(0, len(completions), size)]


def store_logps(ctx, completions: list[dict], key: str, reference: bool) -> None:
    """c[key] = log-probs of c's completion tokens (logits / temperature) under the policy as it is, or under the
    reference (the frozen copy, or the policy with its adapters off); no gradient."""
    import contextlib

    import torch

    from ..forward.policy import completions_logps
    from ..forward.precision import autocast
    from ..forward.reference import reference_of

    m = ctx.cfg.method
    for chunk in chunks(ctx, completions):
        mb = micro_batch(ctx, chunk)
        with torch.no_grad(), autocast(ctx.cfg.train.precision.value, ctx.device), \
                (reference_of(ctx.model, ctx.reference) if reference else contextlib.nullcontext(ctx.model)) as module:
            logp = completions_logps(module, mb, m.temperature)[0]
        for c, row in zip(chunk, logp):
            c[key] = row[:len(c["response"])].detach()


def global_sums(values: dict, real: int) -> dict:
    """Sums over the processes that hold real rows (a stand-in adds zeros)."""
    from ..session import dist

    return dist.all_sum({k: float(v) if real else 0.0 for k, v in values.items()})


def global_std(values, real: int):
    """The unbiased std of the non-NaN values of every process."""
    import torch

    ok = values[~values.isnan()]
    s = global_sums({"n": len(ok), "s": ok.sum(), "ss": (ok.double() ** 2).sum()}, real)
    return torch.tensor(max(s["ss"] - s["s"] ** 2 / max(s["n"], 1), 0.0) / max(s["n"] - 1, 1)).sqrt().float()


def mean_std(values, prefix: str) -> dict:
    """Sums that give the mean and unbiased std of the non-NaN values once added over the processes."""
    ok = values[~values.isnan()]
    return {f"{prefix}n": len(ok), f"{prefix}s": float(ok.sum()), f"{prefix}ss": float((ok.double() ** 2).sum())}


def reward_metrics(ctx, batch: dict, real: int) -> dict:
    """TRL's reward and completion metrics over the step's own prompts (before dynamic sampling), global."""
    from ..objectives.grpo import combine_rewards, nan_std

    first, names = batch["first"], batch["names"]
    rewards = combine_rewards(first["columns"], weights(ctx, names))
    std = nan_std(rewards.view(-1, ctx.cfg.method.num_generations), dim=1)
    local = {**mean_std(rewards, "reward."), "zero": float((std.abs() < 1e-8).sum()), "groups": len(std),
             "length": sum(len(c["response"]) for c in first["completions"]), "count": len(first["completions"]),
             "truncated": sum(c["truncated"] for c in first["completions"])}
    for i, name in enumerate(names):
        local.update(mean_std(first["columns"][:, i], f"{name}."))
    s = global_sums(local, real)

    def stats(prefix):
        n = max(s[f"{prefix}n"], 1)
        return s[f"{prefix}s"] / n, (max(s[f"{prefix}ss"] - s[f"{prefix}s"] ** 2 / n, 0.0) / max(n - 1, 1)) ** 0.5

    out = dict(zip(("reward", "reward_std"), stats("reward.")))
    if len(names) > 1 or ctx.cfg.reward.kind.value == "functions":
        for name in names:
            out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = stats(f"{name}.")
    out.update({"frac_reward_zero_std": s["zero"] / max(s["groups"], 1),
                "completions/mean_length": s["length"] / max(s["count"], 1),
                "completions/clipped_ratio": s["truncated"] / max(s["count"], 1)})
    return out


def update_with(advantages, loss_counts, old_logps, skippable):
    """The method's update: advantages(ctx, rewards, batch) -> (advantages, metrics); loss_counts(method, local,
    global) -> the loss's denominators; old_logps(method) / skippable(method) -> bool."""
    def update(ctx, batch: dict, session, real: int) -> dict:
        return run_update(ctx, batch, session, real, advantages, loss_counts, old_logps, skippable)

    return update


def run_update(ctx, batch, session, real, advantages, loss_counts, old_logps, skippable) -> dict:
    from collections import defaultdict

    from ..forward.precision import autocast
    from ..objectives.grpo import combine_rewards
    from ..session import dist

    m, started, completions = ctx.cfg.method, time.perf_counter(), batch["completions"]
    batch["real"] = real
    if old_logps(m):
        store_logps(ctx, completions, "old_logp", reference=False)
    if m.beta > 0:
        store_logps(ctx, completions, "ref_logp", reference=True)
    rewards = combine_rewards(batch["columns"], weights(ctx, batch["names"]))
    adv, extra = advantages(ctx, rewards, batch)
    for c, a, r in zip(completions, adv.tolist(), rewards.tolist()):
        c["advantage"], c["reward"] = a, r
    batch["samples"] = [{**s, "reward": c["reward"], "advantage": c["advantage"]}
                        for s, c in zip(batch["samples"], completions)]
    counted = [c for c in completions if not (m.mask_truncated_completions and c["truncated"])]
    local = {"sequences": len(completions), "tokens": sum(len(c["response"]) for c in counted)}
    counts = loss_counts(m, local, global_sums(local, real))
    trained = [c for c in counted if c["advantage"] != 0 or not skippable(m)]
    weight = 1.0 if real and trained else 0.0  # else one stand-in forward, so every process steps together
    parts = chunks(ctx, trained or completions[:1])
    totals, passes = defaultdict(float), 0
    for _ in range(m.num_iterations):
        sums = defaultdict(float)
        for i, chunk in enumerate(parts):
            with dist.sync_gradients(ctx.forward, i == len(parts) - 1):
                with autocast(ctx.cfg.train.precision.value, ctx.device):
                    loss, stats = ctx.forward(micro_batch(ctx, chunk), counts)
                session.backward(loss * dist.world() * weight)
            sums["loss"] += float(loss.detach()) * weight
            for key, value in stats.items():
                sums[key] += float(value) * weight
        sums = dist.all_sum(dict(sums))
        lr = session.lr
        grad_norm, ok = session.optimizer_step(sums["loss"])
        if ok:
            passes += 1
            for key, value in per_unit(sums).items():
                totals[key] += value
            totals["grad_norm"] += grad_norm
            totals["lr"] += lr
    out = {k: v / max(passes, 1) for k, v in totals.items()}
    return {**out, **reward_metrics(ctx, batch, real), **extra, "time/update": time.perf_counter() - started}


def per_unit(sums: dict) -> dict:
    """The loss (a sum of shares) and the metrics as means over the tokens (or clipped units) they were summed on;
    none when no completion went through the update (every advantage 0)."""
    out = {"loss": sums["loss"]}
    for key, value in sums.items():
        if key.startswith("clip_ratio/") and sums["_clip_units"]:
            out[key] = value / sums["_clip_units"]
        elif key in ("entropy", "kl") and sums["_tokens"]:
            out[key] = value / sums["_tokens"]
    return out


def before_training(run, coefficient: str = "beta") -> None:
    """With a KL term (method.<coefficient> > 0) and adapter=full: the frozen reference copy
    (forward/reference.py), said in the log. PPO's too."""
    from ..forward.reference import reference_copy
    from ..session.session import say

    m = run.cfg.method
    if m[coefficient] > 0:
        line = reference_copy(run, m.ref_quant.value, f"method.{coefficient}={m[coefficient]} with adapter="
                                                      f"{run.cfg.adapter.name}")
        if line:
            say(line)


def check(cfg) -> None:
    m = cfg.method
    validate_sampling(m, "method", greedy=False)
    require(m.num_generations >= 2, "method.num_generations", m.num_generations,
            "must be >= 2 (a group's rewards are compared with each other)")
    if m.micro_batch_size is not None and (m.micro_batch_size < 1 or m.micro_batch_size % m.num_generations):
        raise UsageError(f"method.micro_batch_size={m.micro_batch_size} is not a multiple of method.num_generations="
                         f"{m.num_generations}: a micro-batch holds whole groups (a prompt's completions share one "
                         f"prefill); e.g. method.micro_batch_size={2 * m.num_generations}")
    require(m.beta >= 0, "method.beta", m.beta, "must be >= 0 (0 = no KL term, no reference forward)")
    require(m.epsilon > 0, "method.epsilon", m.epsilon, "must be > 0")
    if m.epsilon_high is not None:
        require(m.epsilon_high > 0, "method.epsilon_high", m.epsilon_high, "must be > 0 (null = method.epsilon)")
    for key in ("num_iterations", "sample_every"):
        require(m[key] >= 1, f"method.{key}", m[key], "must be >= 1")
    require(m.max_resamples >= 0, "method.max_resamples", m.max_resamples, "must be >= 0")
    if m.ref_quant.value != "none" and not (m.beta > 0 and cfg.adapter.name == "full"):
        raise UsageError(f"method.ref_quant={m.ref_quant.value} quantises the frozen reference copy, which only "
                         f"adapter=full with method.beta > 0 loads (other adapters' reference is the base with the "
                         f"adapter off): drop it")
