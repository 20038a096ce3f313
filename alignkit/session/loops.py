"""The two training loops, explicit top to bottom, around one Session.

Offline methods give `step(model, batch, denominator, method) -> (loss, stats)`: the loss of one micro-batch
already divided by the count (pairs or tokens) of the whole accumulated step, and stats as sums over that
micro-batch's units, so k micro-batches of size b give exactly the numbers of one batch of k*b. Online
methods give `rollout(ctx, rows) -> batch` (sample, score) and `update(ctx, batch, session, real) -> stats`
(their optimizer steps, through the session).

With several processes (dist.py) each runs the step through the DDP/FSDP wrapper on its part of every global
micro-batch of batch_size x processes rows; the count is the global one, so p processes of batch b give the
numbers of one process of batch p*b.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from ..data.collate import to_device
from ..forward.precision import autocast
from . import dist
from .batches import step_windows


def run_batches(forward, micro: list, collate, precision: str, device, backward=None) -> dict:
    """forward(batch, global count) over this process's micro-batches, with backward(loss) for training;
    returns the global sums: loss, stats per unit, _tokens, _samples.

    The loss is scaled by the number of processes before backward (DDP and FSDP average the
    gradients, the global loss is their sum); a stand-in micro-batch (0 real rows) counts zero.
    """
    batches = [(to_device(collate(rows), device), real > 0) for rows, real in micro]
    denom = int(step_counts(batches)["count"])
    sums: dict[str, float] = defaultdict(float)
    for i, (batch, real) in enumerate(batches):
        with dist.sync_gradients(forward, i == len(batches) - 1):
            with autocast(precision, device):
                loss, stats = forward(batch, denom)
            if backward is not None:
                backward(loss * (dist.world() if real else 0.0))
        # a stand-in adds zeros (not its numbers times 0, which a NaN would survive): same keys everywhere
        sums["loss"] += float(loss.detach()) if real else 0.0
        for k, v in stats.items():
            sums[k] += float(v) / denom if real else 0.0
        sums["_tokens"] += int(batch["attention_mask"].sum()) if real else 0
        sums["_samples"] += batch["samples"] if real else 0
    return dist.all_sum(sums)


def step_counts(batches: list) -> dict:
    """The step's global counts, summed over its real micro-batches and the processes: "count" (the loss
    denominator) and those a batch lists under "counts" (KTO's desirable rows, ORPO's NLL tokens). Each batch
    gets them as "step_counts", and "stand_in": whether it is a stand-in (its rows count zero in a method's own
    collectives too)."""
    local: dict[str, float] = defaultdict(float)
    for batch, real in batches:
        for key, value in {"count": batch["count"], **batch.get("counts", {})}.items():
            local[key] += value if real else 0
    totals = dist.all_sum(local)
    for batch, real in batches:
        batch["step_counts"], batch["stand_in"] = totals, not real
    return totals


def evaluate(forward, examples, collate, cfg, device) -> dict:
    """Loss and stats over held-out examples, as means per unit (pair or token).

    forward: dist.wrap's module (or LossModule(model, step)); each process takes its share."""
    if not examples:
        return {}
    forward.eval()
    size = cfg.train.eval_batch_size * dist.world()
    micro = [dist.share(examples[i:i + size], dist.rank(), dist.world()) for i in range(0, len(examples), size)]
    with torch.no_grad():
        sums = run_batches(forward, micro, collate, cfg.train.precision.value, device)
    return {f"eval/{k}": v for k, v in sums.items() if not k.startswith("_")}


def offline_loop(session, forward, train_examples, eval_examples, collate) -> dict:
    """Optimizer steps over micro-batches of the examples; then the held-out evaluation. Final metrics."""
    t, device = session.cfg.train, session.device
    windows = step_windows(train_examples, t, session.per_epoch, session.start, session.total, t.grad_accum,
                           dist.rank(), dist.world())
    with session.running():
        for step, epoch, micro in windows:
            forward.train()
            started = time.perf_counter()
            sums = run_batches(forward, micro, collate, t.precision.value, device, session.backward)
            sums["lr"] = session.lr
            sums["grad_norm"], _ = session.optimizer_step(sums["loss"])
            session.end_step(step + 1, epoch, sums, time.perf_counter() - started)
        held = evaluate(forward, eval_examples, collate, session.cfg, device)
        if held:
            session.log("metrics.jsonl", {"step": session.total, **held})
    return {**session.summary(), **held}


def online_loop(session, method, ctx, prompts: list) -> dict:
    """Each step: a rollout of this process's share of batch_size x processes prompts (sampled, scored), then
    the method's update on it. Samples go to samples.jsonl every method.sample_every steps."""
    t = session.cfg.train
    rank, world = dist.rank(), dist.world()
    if world > 1:  # each process samples its own completions: RNG = f(seed, rank, step resumed at)
        torch.manual_seed(t.seed + 1_000_003 * rank + session.start)
    windows = step_windows(prompts, t, session.per_epoch, session.start, session.total, 1, rank, world)
    with session.running(samples=True):
        for step, epoch, [(rows, real)] in windows:
            started = time.perf_counter()
            ctx.step = step
            batch = method.rollout(ctx, rows)
            stats = method.update(ctx, batch, session, real)
            record = dist.all_mean(batch["metrics"], real)
            record.update(stats)
            seconds = time.perf_counter() - started
            record.update(dist.all_sum({"_tokens": batch["tokens"] * (real > 0), "_samples": real,
                                        "gen_tokens_per_s": batch["metrics"]["gen_tokens_per_s"] * (real > 0)}))
            session.end_step(step + 1, epoch, record, seconds)
            if step % ctx.cfg.method.sample_every == 0:
                for sample in batch["samples"][:4]:
                    session.log("samples.jsonl", {"step": step + 1, **sample})
    return session.summary()


def minibatch_updates(session, forward, rows_tensors: dict, real: int, epochs: int, minibatches: int,
                      generator, precision: str, device) -> tuple[dict, bool]:
    """An online method's update: `epochs` passes over its rollout rows, each split into `minibatches` optimizer
    steps of forward(minibatch, 1) (the method's step, a mean over the minibatch). rows_tensors: tensors with one
    row per rollout; real: this process's real rows (0 for a stand-in). Returns (mean stats of the updates that
    ran, whether none was skipped).

    Every row is used in every pass: minibatch sizes differ by at most one (a short last batch included). An
    empty minibatch (fewer rows than minibatches) runs a stand-in row weighted 0, so every process makes the same
    optimizer steps and collectives; one that is empty on every process is left out. DDP averages the processes'
    gradients, so each process's loss is weighted by its share of the minibatch's rows."""
    n = len(next(iter(rows_tensors.values())))
    stats: dict[str, float] = defaultdict(float)
    updates, ok_all = 0, True
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for idx in torch.tensor_split(order, minibatches):
            rows = len(idx) if real else 0
            global_rows = dist.all_sum({"rows": rows})["rows"]
            if global_rows == 0:
                continue
            idx = idx if len(idx) else order[:1]
            with autocast(precision, device):
                loss, mb_stats = forward({k: v[idx] for k, v in rows_tensors.items()}, 1)
            session.backward(loss * dist.world() * rows / global_rows)
            lr = session.lr
            mb_stats = dist.all_mean({k: float(v.detach()) for k, v in mb_stats.items()}, rows)
            grad_norm, ok = session.optimizer_step(mb_stats["loss"])
            ok_all &= ok
            if ok:
                for key, value in {**mb_stats, "grad_norm": grad_norm, "lr": lr}.items():
                    stats[key] += value
                updates += 1
    return {k: v / max(updates, 1) for k, v in stats.items()}, ok_all
