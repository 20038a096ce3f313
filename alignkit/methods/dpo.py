"""DPO and its family (cDPO, IPO, hinge, SimPO) on policy vs reference log-probs; `ipo` and `simpo` are presets.

The reference is the same model with its adapters disabled. With no adapter to disable (an adapter that
trains the base weights: full, bitdelta), or with method.precompute_ref=true, the reference log-probs are
computed once before the first step by the same forward as the live reference and cached in the run dir
(ref_logps.safetensors, keyed by the reference weights, the precision and the tokens), so a resumed run
reuses them. SimPO has no reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import partial

from omegaconf import MISSING

from ..adapters import ADAPTERS, packing
from ..data.tokenize import encode_rows
from ..errors import UsageError, require
from .record import Method


class DPOLoss(Enum):
    sigmoid = "sigmoid"
    cdpo = "cdpo"
    ipo = "ipo"
    hinge = "hinge"
    simpo = "simpo"


@dataclass
class DPOMethod:
    name: str = MISSING
    beta: float = MISSING
    loss: DPOLoss = MISSING
    label_smoothing: float = MISSING
    gamma: float = MISSING
    precompute_ref: bool = MISSING


def uses_reference(method) -> bool:
    return method.loss.value != "simpo"


def preference_losses(method, policy, tokens, ref, n: int):
    """Dispatch on method.loss; policy/tokens/ref are (2n,) with chosen rows first."""
    from ..objectives import dpo_loss, hinge_loss, ipo_loss, simpo_loss

    name = method.loss.value
    pc, pr, tc, tr = policy[:n], policy[n:], tokens[:n], tokens[n:]
    if name == "simpo":
        return simpo_loss(pc, pr, tc, tr, method.beta, method.gamma)
    rc, rr = ref[:n], ref[n:]
    if name in ("sigmoid", "cdpo"):
        return dpo_loss(pc, pr, rc, rr, method.beta, method.label_smoothing)
    if name == "ipo":
        return ipo_loss(pc, pr, rc, rr, tc, tr, method.beta)
    return hinge_loss(pc, pr, rc, rr, method.beta)


def dpo_step(model, batch: dict, denominator: int, method):
    from ..forward.logps import sequence_logps
    from ..forward.reference import batch_reference

    n = batch["count"]
    policy, tokens = sequence_logps(model, batch)
    ref = batch_reference(model, batch, ("ref_chosen", "ref_rejected")) if uses_reference(method) else None
    losses, chosen_r, rejected_r = preference_losses(method, policy, tokens, ref, n)
    return losses.sum() / denominator, pair_stats(chosen_r, rejected_r, policy[:n], policy[n:])


def pair_stats(chosen_r, rejected_r, logps_chosen, logps_rejected) -> dict:
    """TRL's numbers of a batch of pairs, as sums over its pairs: rewards/*, logps/*."""
    return {
        "rewards/chosen": chosen_r.sum(),
        "rewards/rejected": rejected_r.sum(),
        "rewards/accuracies": (chosen_r > rejected_r).float().sum(),  # strict, as TRL
        "rewards/margins": (chosen_r - rejected_r).sum(),
        "logps/chosen": logps_chosen.detach().sum(),
        "logps/rejected": logps_rejected.detach().sum(),
    }


def prepare(cfg, tokenizer, rows):
    from ..data.collate import collate_preference

    examples = encode_rows(tokenizer, rows, cfg.data, "preference")
    return examples, partial(collate_preference, pad_id=tokenizer.pad_token_id, packed=packing(cfg))


def precomputed_reference(run) -> bool:
    """The run's reference log-probs are computed before training: it uses a reference and asked for this
    (method.precompute_ref), or has no adapter to switch off."""
    cfg = run.cfg
    return run.method.reference(cfg.method) and (cfg.method.precompute_ref or ADAPTERS[cfg.adapter.name].trains_base)


def before_training(run) -> None:
    """One reference pass before training (no reference forward, or second model copy, while training) with the
    method's reference_values; rank 0 writes the cache, the other processes then read it."""
    from ..forward.reference import precompute_reference
    from ..session import dist

    if precomputed_reference(run):
        dist.main_first(lambda: precompute_reference(
            run.model, run.train_examples + run.eval_examples, run.collate, run.cfg.train.eval_batch_size,
            run.device, run.cfg.train.precision.value, run.run_dir / "ref_logps.safetensors",
            run.method.reference_values))


def pair_reference_values(model, batch: dict) -> dict:
    from ..forward.reference import pair_reference

    return pair_reference(model, batch)


def check(cfg) -> None:
    m = cfg.method
    require(m.beta > 0, "method.beta", m.beta, "must be > 0")
    require(0 <= m.label_smoothing < 0.5, "method.label_smoothing", m.label_smoothing, "must be in [0, 0.5)")
    if m.loss.value == "simpo" and m.precompute_ref:
        raise UsageError("method.loss=simpo uses no reference model: drop method.precompute_ref=true")
    if m.loss.value == "cdpo":
        require(m.label_smoothing > 0, "method.label_smoothing", m.label_smoothing,
                "method.loss=cdpo needs a label_smoothing > 0 (e.g. 0.1)")


METHOD = Method("dpo", DPOMethod, data="preference", head="lm", adapters=tuple(ADAPTERS),
                metrics=("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"),
                prepare=prepare, step=dpo_step, reference=uses_reference, reference_values=pair_reference_values,
                check=check, before_training=before_training, presets=("ipo", "simpo"))
