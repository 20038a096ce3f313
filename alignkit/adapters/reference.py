"""The reference policy (DPO, PPO, eval), and saving an adapter so final/ applies to the original base.

The reference is the model training started from. For most adapters that is the base with the
adapter (LoRA, virtual tokens) switched off. Inits that start the adapter away from zero (PiSSA, OLoRA, LoftQ:
lora_init.py) keep a frozen copy of the initial adapter, REFERENCE (TRL's name for it); the
reference is then the base plus that copy. Every reference forward goes through reference_mode().
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from .lora_rules import moves_base


REFERENCE = "ref"


def has_reference_adapter(model) -> bool:
    return REFERENCE in getattr(model, "peft_config", {})


@contextlib.contextmanager
def reference_mode(model):
    """Inside: the model computes the reference policy. No-grad use; trainable flags are restored after.
    A model without adapters (full, bitdelta before training) is its own reference."""
    if not hasattr(model, "disable_adapter"):
        yield
        return
    if not has_reference_adapter(model):
        with model.disable_adapter():
            yield
        return
    # peft's set_adapter also flips requires_grad (the active adapter trainable): keep the flags as they were
    flags = [(p, p.requires_grad) for p in model.parameters()]
    previous = model.active_adapter
    model.set_adapter(REFERENCE)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


def save_adapter(model, out: Path, state_dict=None) -> None:
    """Write the "default" adapter to out/ as a peft adapter dir that applies to the original base.

    An init that moved weights out of the base (PiSSA, OLoRA) is converted by peft
    (path_initial_model_for_weight_conversion): ΔW = sBA - sB0A0 as a LoRA of rank 2r over the
    original W. peft's conversion keeps only the LoRA matrices, so the other saved weights (a reward
    model's score head) are written back. A LoftQ run also writes its initial adapter to out/ref/
    (the reference, for eval); its base is the same 4-bit base, so it needs no conversion.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    kwargs = {"selected_adapters": ["default"]}
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    if not has_reference_adapter(model) or not moves_base(str(model.peft_config["default"].init_lora_weights)):
        model.save_pretrained(out, **kwargs)
        if has_reference_adapter(model):
            model.save_pretrained(out, selected_adapters=[REFERENCE])  # -> out/ref/
        return
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch, selected_adapters=[REFERENCE])  # -> scratch/ref/
        initial = Path(scratch) / "initial"  # peft loads it under its folder's name, which must be new
        shutil.move(str(Path(scratch) / REFERENCE), initial)
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial), **kwargs)
    others = {k: v for k, v in get_peft_model_state_dict(model, adapter_name="default").items()
              if "lora_A" not in k and "lora_B" not in k}
    if others:
        file = Path(out) / "adapter_model.safetensors"
        save_file({**load_file(file), **{k: v.detach().cpu().contiguous() for k, v in others.items()}}, file,
                  metadata={"format": "pt"})
