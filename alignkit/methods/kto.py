"""KTO (Ethayarajh et al. 2024): learns from single answers labelled desirable or undesirable (unpaired data;
preference pairs are unpaired into both). Summed completion log-probs; reference = the base with adapters off,
or precomputed as for DPO (always for adapters that train the base weights: full, bitdelta).

The reference point z is the KL of policy to reference on mismatched pairs: each row's prompt with the
completion of the row before it in the batch (TRL's shift by one), detached, averaged over all processes,
clamped at 0. A precomputed reference fixes each row's partner first (the row before it in its block of
train.batch_size rows, in data order, as TRL's KTOTrainer), so the pair's reference log-prob can be cached;
with train.shuffle=false those blocks are the batches themselves.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from functools import partial

from omegaconf import MISSING

from ..adapters import ADAPTERS, packing
from ..data.tokenize import encode_rows
from ..errors import UsageError, require
from .dpo import before_training as precompute_before_training, precomputed_reference
from .record import Method

REFERENCE = ("ref_logps", "ref_kl_logps")  # what a precomputed reference stores: the rows', their pairs'
BALANCE = (1.0, 4 / 3)  # the paper's range (Eq. 8) of desirable_weight n_desirable / (undesirable_weight n_undesirable)


class KTOLoss(Enum):
    kto = "kto"
    apo_zero_unpaired = "apo_zero_unpaired"


@dataclass
class KTOLossKeys:
    """The loss's own keys: which loss, the weights of the desirable and of the undesirable rows."""
    loss_type: KTOLoss = MISSING
    desirable_weight: float = MISSING
    undesirable_weight: float = MISSING


@dataclass
class KTOMethod(KTOLossKeys):
    """method.* for method=kto; the values are in configs/method/kto.yaml."""
    name: str = MISSING
    beta: float = MISSING
    precompute_ref: bool = MISSING


def class_means(values, desirable, counts: dict, denominator: int) -> dict:
    """Stats whose step totals are means over the step's desirable ("chosen") or undesirable ("rejected") rows
    and their difference: each a sum over this batch's rows, scaled so that the loop's division by the
    denominator leaves row / class count. values: {name: (B,) detached}; a class the step lacks is left out."""
    d = desirable.float()
    n_d, n_u = counts["desirable"], counts["undesirable"]
    stats = {}
    for name, v in values.items():
        if n_d:
            stats[f"{name}/chosen"] = (v * d).sum() * denominator / n_d
        if n_u:
            stats[f"{name}/rejected"] = (v * (1 - d)).sum() * denominator / n_u
    if n_d and n_u:
        stats["rewards/margins"] = (values["rewards"] * (d / n_d - (1 - d) / n_u)).sum() * denominator
    return stats


def kto_step(model, batch: dict, denominator: int, method):
    import torch

    from ..forward.logps import sequence_logps
    from ..forward.reference import batch_reference
    from ..objectives import kl_point, kto_loss
    from ..session import dist

    n, pairs = batch["count"], batch["kl_pairs"]
    policy = sequence_logps(model, batch)[0]
    ref = batch_reference(model, batch, REFERENCE if pairs else REFERENCE[:1])
    z = 0.0
    if pairs:  # this batch's mismatched pairs, with every process's: one reference point for the batch
        real = not batch.get("stand_in", False)
        log_ratio = float((policy[n:] - ref[n:]).detach().sum())
        total = dist.all_sum({"log_ratio": log_ratio if real else 0.0, "pairs": n if real else 0})
        z = kl_point(total["log_ratio"], total["pairs"])
    losses, rewards = kto_loss(policy[:n], ref[:n], batch["label"], z, method.beta, method.desirable_weight,
                               method.undesirable_weight, method.loss_type.value)
    counts = batch.get("step_counts", batch["counts"])  # called alone, the batch is the whole step
    stats = {"kl": torch.tensor(z * n), **class_means({"rewards": rewards, "logps": policy[:n].detach()},
                                                      batch["label"], counts, denominator)}
    return losses.sum() / denominator, stats


def prepare(cfg, tokenizer, rows):
    from ..data.collate import collate_unpaired

    examples = encode_rows(tokenizer, rows, cfg.data, "unpaired")
    return examples, partial(collate_unpaired, pad_id=tokenizer.pad_token_id, max_length=cfg.data.max_length,
                             kl=cfg.method.loss_type.value == "kto", packed=packing(cfg))


def reference_values(model, batch: dict) -> dict:
    from ..forward.reference import split_reference

    return split_reference(model, batch, REFERENCE if batch["kl_pairs"] else REFERENCE[:1])


def fix_partners(examples: list, size: int) -> None:
    """Each row's mismatched completion, fixed: the row before it in its block of `size` rows (the first takes
    the block's last), as TRL's KTOTrainer pairs them."""
    for i in range(0, len(examples), size):
        block = examples[i:i + size]
        for e, other in zip(block, block[-1:] + block[:-1]):
            e["kl_completion_ids"] = other["completion_ids"]


def before_training(run) -> None:
    if precomputed_reference(run) and run.cfg.method.loss_type.value == "kto":
        fix_partners(run.train_examples, run.cfg.train.batch_size)
        fix_partners(run.eval_examples, run.cfg.train.eval_batch_size)
    precompute_before_training(run)


def check(cfg) -> None:
    m = cfg.method
    require(m.beta > 0, "method.beta", m.beta, "must be > 0")
    require(m.desirable_weight > 0, "method.desirable_weight", m.desirable_weight, "must be > 0")
    require(m.undesirable_weight > 0, "method.undesirable_weight", m.undesirable_weight, "must be > 0")
    if m.loss_type.value == "kto":
        require(cfg.train.batch_size > 1, "train.batch_size", cfg.train.batch_size,
                "method.loss_type=kto needs > 1 rows per batch: its KL reference point pairs each row's prompt "
                "with another row's completion (or method.loss_type=apo_zero_unpaired, which has none)")


def check_data(cfg, examples: list) -> None:
    """Both labels among the training rows; a warning (rank 0) when the weighted balance is off the paper's."""
    from ..session import dist

    n_d = sum(e["label"] for e in examples)
    n_u = len(examples) - n_d
    if not (n_d and n_u):
        raise UsageError(f"data: every training row has label={'true' if n_d else 'false'} ({len(examples)} rows): "
                         f"KTO learns from desirable (label true) and undesirable (label false) answers, so it "
                         f"needs both")
    m = cfg.method
    balance = m.desirable_weight * n_d / (m.undesirable_weight * n_u)
    if not BALANCE[0] <= balance <= BALANCE[1] and dist.is_main():
        low, high = (b * m.undesirable_weight * n_u / n_d for b in BALANCE)
        print(f"alignkit: KTO's weighted balance desirable_weight x {n_d} desirable / (undesirable_weight x {n_u} "
              f"undesirable) = {balance:.3g} is outside the paper's [1, 4/3]: e.g. method.desirable_weight in "
              f"[{low:.3g}, {high:.3g}]", file=sys.stderr)


METHOD = Method("kto", KTOMethod, data="unpaired", head="lm", adapters=tuple(ADAPTERS), metrics=("loss", "kl"),
                prepare=prepare, step=kto_step, reference_values=reference_values, check=check,
                check_data=check_data, before_training=before_training)
