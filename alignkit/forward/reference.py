"""The reference policy: the same model with its adapters switched off (one base copy in memory; an adapter
that starts away from zero switches to its frozen initial copy: adapters/reference.py), live or computed once
before training and cached (keyed by the weights it runs on, the precision and the tokens)."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapters.reference import reference_mode
from ..data.collate import to_device
from ..models.fingerprint import weights_fingerprint
from .logps import sequence_logps
from .precision import autocast


@contextlib.contextmanager
def reference_of(model, frozen=None):
    """The module a reference forward runs on: the frozen copy of the base when there is one (adapter=full, see
    models/frozen.py), else `model` itself in reference_mode (adapters off, or its
    frozen initial adapter)."""
    if frozen is not None:
        yield frozen
        return
    with reference_mode(model):
        yield model


def reference_copy(run, quant: str, why: str) -> str | None:
    """For a live reference (an online method's KL term) of a policy that trains every weight (adapter=full: no
    adapter to switch off): run.reference = a frozen copy of the run's base (models/frozen.py; its policy.init
    included), int8/nf4 when `quant` says; returns the line that says so. Any other adapter: nothing (None)."""
    from omegaconf import OmegaConf

    from ..adapters import ADAPTERS
    from ..models.frozen import load_frozen_copy

    if not ADAPTERS[run.cfg.adapter.name].trains_base:
        return None
    base = OmegaConf.merge(run.cfg.model, {"path": run.model_dir})
    run.reference, line = load_frozen_copy(base, run.model, run.device, quant, why)
    return line


def reference_sequence_logps(model, batch: dict) -> torch.Tensor:
    """Summed completion log-probs of each row under the reference, (B,), no gradient."""
    with torch.no_grad(), reference_mode(model):
        return sequence_logps(model, batch)[0]


def split_reference(model, batch: dict, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The reference log-probs of a batch laid out as len(names) groups of batch["count"] rows (a preference
    batch: chosen rows, then rejected rows): {name: (count,)}, one per group."""
    lp, n = reference_sequence_logps(model, batch), batch["count"]
    return {name: lp[i * n:(i + 1) * n] for i, name in enumerate(names)}


def pair_reference(model, batch: dict) -> dict[str, torch.Tensor]:
    """A preference batch's reference log-probs: {ref_chosen, ref_rejected}, (pairs,) each (chosen rows first)."""
    return split_reference(model, batch, ("ref_chosen", "ref_rejected"))


def batch_reference(model, batch: dict, names: tuple[str, ...]) -> torch.Tensor:
    """The reference's summed log-probs of every row of the batch, in order: precomputed in the batch (the
    columns `names`, one per group of rows), or live (adapters off)."""
    if names[0] in batch:
        return torch.cat([batch[name] for name in names])
    return reference_sequence_logps(model, batch)


def reference_key(model, examples: list, precision: str) -> str:
    """What cached reference values depend on: the weights the reference runs on, the precision, the tokens."""
    h = hashlib.sha256(f"{weights_fingerprint(model, skip_trainable=hasattr(model, 'disable_adapter'))}|"
                       f"{precision}".encode())
    for e in examples:
        h.update(repr(sorted((k, v) for k, v in e.items() if not k.startswith("ref_") and k != "source")).encode())
    return h.hexdigest()


def precompute_reference(model, examples: list, collate, batch_size: int, device, precision: str, cache: Path,
                         values=pair_reference) -> None:
    """Store the reference values (values(model, batch) -> {name: (len(chunk),)}) in each example: from the cache
    when its key matches, else from the live reference forward of the model as it is now, then cached."""
    key = reference_key(model, examples, precision)
    if cache.exists():
        saved = load_file(cache)
        if saved.pop("fingerprint").numpy().tobytes().decode() == key:
            for name, column in saved.items():
                for e, v in zip(examples, column.tolist()):
                    e[name] = v
            return
    was_training = model.training
    model.eval()
    with autocast(precision, device):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            for name, column in values(model, to_device(collate(chunk), device)).items():
                for e, v in zip(chunk, column.tolist()):
                    e[name] = v
    model.train(was_training)
    names = [k for k in examples[0] if k.startswith("ref_")] if examples else []
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")  # renamed into place: a kill never leaves a torn cache
    save_file({**{name: torch.tensor([e[name] for e in examples]) for name in names},
               "fingerprint": torch.frombuffer(bytearray(key.encode()), dtype=torch.uint8)}, tmp)
    os.replace(tmp, cache)
