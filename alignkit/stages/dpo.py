"""DPO stage (and its family: cDPO, IPO, hinge, SimPO) on policy vs reference log-probs.

The reference is the same model with its adapters disabled. With no adapter to
disable (adapter=full or bitdelta), or with method.precompute_ref=true, the reference
log-probs are computed once before the first step, by the same forward as the live
reference, and cached in the run dir (ref_logps.safetensors, keyed by the reference
weights, the precision and the tokens), so a resumed run reuses them. SimPO has no reference.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapters import WEIGHT_ADAPTERS
from ..data.collate import collate_preference
from ..data.tokenize import encode_rows
from ..models.fingerprint import weights_fingerprint
from ..objectives import dpo_loss, hinge_loss, ipo_loss, simpo_loss
from .common import autocast, packing, sequence_logps, to_device


def adapters_off(model):
    """The reference: the model with its adapters (LoRA, virtual tokens) switched off; a model without
    adapters (full, bitdelta before training) is its own reference."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def live_reference_logps(model, batch: dict) -> torch.Tensor:
    with torch.no_grad(), adapters_off(model):
        return sequence_logps(model, batch)[0]


def reference_logps(model, batch: dict) -> torch.Tensor:
    if "ref_chosen" in batch:
        return torch.cat([batch["ref_chosen"], batch["ref_rejected"]])
    return live_reference_logps(model, batch)


def preference_losses(method, policy, tokens, ref, n: int):
    """Dispatch on method.loss; policy/tokens/ref are (2n,) with chosen rows first."""
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
    n = batch["count"]
    policy, tokens = sequence_logps(model, batch)
    ref = None if method.loss.value == "simpo" else reference_logps(model, batch)
    losses, chosen_r, rejected_r = preference_losses(method, policy, tokens, ref, n)
    stats = {
        "rewards/chosen": chosen_r.sum(),
        "rewards/rejected": rejected_r.sum(),
        "rewards/accuracies": (chosen_r > rejected_r).float().sum(),  # strict, as TRL
        "rewards/margins": (chosen_r - rejected_r).sum(),
        "logps/chosen": policy[:n].detach().sum(),
        "logps/rejected": policy[n:].detach().sum(),
    }
    return losses.sum() / denominator, stats


def needs_precomputed_reference(cfg) -> bool:
    if cfg.method.loss.value == "simpo":
        return False
    return cfg.method.precompute_ref or cfg.adapter.name in WEIGHT_ADAPTERS


def reference_key(model, examples: list, precision: str) -> str:
    """What the reference log-probs depend on: the weights the reference runs on, the precision, the tokens."""
    h = hashlib.sha256(f"{weights_fingerprint(model, skip_trainable=hasattr(model, 'disable_adapter'))}|"
                       f"{precision}".encode())
    for e in examples:
        h.update(str((e["chosen"]["input_ids"], e["rejected"]["input_ids"])).encode())
    return h.hexdigest()


def precompute_reference(model, examples: list, collate, batch_size: int, device, precision: str,
                         cache: Path) -> None:
    """Store ref_chosen / ref_rejected in each example: from the cache when its key matches, else from the
    live reference forward (adapters off) of the model as it is now."""
    key = reference_key(model, examples, precision)
    if cache.exists():
        saved = load_file(cache)
        if saved["fingerprint"].numpy().tobytes().decode() == key:
            for e, c, r in zip(examples, saved["chosen"].tolist(), saved["rejected"].tolist()):
                e["ref_chosen"], e["ref_rejected"] = c, r
            return
    was_training = model.training
    model.eval()
    with autocast(precision, device):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            lp = live_reference_logps(model, to_device(collate(chunk), device))
            for j, e in enumerate(chunk):
                e["ref_chosen"], e["ref_rejected"] = float(lp[j]), float(lp[len(chunk) + j])
    model.train(was_training)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")  # renamed into place: a kill never leaves a torn cache
    save_file({"chosen": torch.tensor([e["ref_chosen"] for e in examples]),
               "rejected": torch.tensor([e["ref_rejected"] for e in examples]),
               "fingerprint": torch.frombuffer(bytearray(key.encode()), dtype=torch.uint8)}, tmp)
    os.replace(tmp, cache)


def prepare(cfg, tokenizer, rows):
    examples = encode_rows(tokenizer, rows, cfg.data, "preference")
    return examples, partial(collate_preference, pad_id=tokenizer.pad_token_id, packed=packing(cfg)), partial(dpo_step, method=cfg.method)
