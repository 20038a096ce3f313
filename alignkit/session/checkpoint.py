"""Checkpoints and final outputs, written to a temp dir and renamed into place.

Only safetensors and JSON are written (no pickles). A checkpoint holds the
trainable weights, the optimizer and scheduler state, the RNG states and the
step (the data position follows from the step and the seed).

With several processes rank 0 writes it; under FSDP the shards are gathered first (every
process takes part), so a checkpoint holds whole tensors whatever the strategy and process
count, and any of them can resume it (each process reads it and keeps its own shard).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapters.reference import save_adapter
from ..io import atomic_dir
from . import dist
from .rundir import checkpoints


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: dist.full(p.detach()).contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _split_optimizer(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = dist.full(value).contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict, meta: dict, params: list) -> dict:
    """The optimizer state dict again; state tensors shaped like their parameter laid out as it is (FSDP)."""
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = flat.split(".", 1)
        param = params[int(pid)]
        if torch.is_tensor(value) and value.shape == param.shape:
            value = dist.like(value, param)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, extra: dict, scaler=None) -> None:
    """Every process calls it (FSDP gathers shards); rank 0 writes. scaler: fp16's gradient scaler, if any."""
    weights = trainable_state(model)
    tensors, meta = _split_optimizer(optimizer)
    if not dist.is_main():
        return

    def write(tmp: Path) -> None:
        save_file(weights, tmp / "trainable.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        state = {"step": step, "optimizer": meta, "scheduler": scheduler.state_dict(),
                 "python_rng": random.getstate(), **extra}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        (tmp / "state.json").write_text(json.dumps(state, default=str))

    atomic_dir(path, write)


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None) -> dict:
    """Restore weights, optimizer, scheduler, RNG (and fp16's gradient scaler); return state.json."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(dist.like(value, params[name]))
    device = next(iter(params.values())).device
    tensors = {k: v.to(device) for k, v in load_file(path / "optimizer.safetensors").items()}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]  # the state dict's ids
    optimizer.load_state_dict(_join_optimizer(tensors, state["optimizer"], ordered))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove temp dirs a killed run left (never our own live one).

    An old checkpoint is renamed to a hidden dir before it is deleted: a kill in the middle of the
    delete leaves that hidden dir (removed next time), never a step-N that lost some of its files."""
    for old in checkpoints(run_dir)[:-keep]:
        trash = old.parent / f".old-{old.name}-{os.getpid()}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for pattern in (".tmp-*", ".old-*"):
        for stale in (Path(run_dir) / "checkpoints").glob(pattern):
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)


def save_final(path: Path, model, tokenizer, extra=None, state_dict=None) -> None:
    """final/: a peft adapter dir (the trained "default" adapter, applying to the original base:
    adapters/reference.py) or a full model dir, plus the tokenizer; extra(tmp_dir) adds a method's files (PPO's
    value head). state_dict: the model's whole tensors when FSDP shards it (dist.gathered_state); None = read
    the model."""
    def write(tmp: Path) -> None:
        if hasattr(model, "peft_config"):
            save_adapter(model, tmp, state_dict)
        else:
            model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(model, tmp)

    atomic_dir(path, write)
