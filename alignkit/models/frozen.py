"""A frozen second copy of the base: the reference of a policy that trains every weight (adapter=full), where
there is no adapter to switch off. Optionally 8-bit or 4-bit (bitsandbytes); refused up front when it clearly
does not fit in the memory left."""
from __future__ import annotations

import torch

from ..errors import UsageError
from .load import load_base_model, resolve_dtype

QUANT_BYTES = {"int8": 1.0, "nf4": 0.5}  # per weight of a quantised Linear (plus small scales, not counted)


def free_bytes(device: torch.device) -> int:
    """Memory a new copy can take: free GPU memory on a GPU, else the RAM the OS reports available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def copy_bytes(model, dtype: torch.dtype, quant: str) -> int:
    """Bytes of a copy of `model`'s base in `dtype`, its Linear weights in `quant` ("none" | "int8" | "nf4")."""
    per_param = torch.finfo(dtype).bits / 8
    total, seen = 0.0, set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weights count once
            seen.add(id(p))
            quantised = quant in QUANT_BYTES and isinstance(module, torch.nn.Linear) and name == "weight" \
                and not module_name.endswith("lm_head")  # bitsandbytes keeps the output layer as it is
            total += p.numel() * (QUANT_BYTES[quant] if quantised else per_param)
    return int(total)


def quantization(quant: str, device: torch.device):
    """bitsandbytes settings of a quantised copy: int8 (LLM.int8) or nf4 (4-bit NF4) with double quantisation."""
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load_frozen_copy(model_cfg, policy, device: torch.device, quant: str, why: str):
    """(the base again, frozen, in eval mode; a line saying what it is), after checking that it fits (UsageError
    otherwise). why: what asks for it, for the messages (e.g. "method.beta=0.04 with adapter=full")."""
    dtype = resolve_dtype(model_cfg.dtype.value, device)
    need, free = copy_bytes(policy, dtype, quant), free_bytes(device)
    if need > free:
        raise UsageError(f"{why} needs a frozen second copy of the base as its reference ({need / 2**30:.2f} GiB), "
                         f"but only {free / 2**30:.2f} GiB is free on the {device.type}: quantise it "
                         f"(method.ref_quant=int8 or nf4), use an adapter whose reference is the base with the "
                         f"adapter off (adapter=lora), or drop the KL term")
    copy, _, _ = load_base_model(model_cfg, device, quantization=None if quant == "none" else quantization(quant, device))
    copy.requires_grad_(False)
    kind = f"{quant} weights" if quant != "none" else str(dtype).removeprefix("torch.")
    return copy.eval(), (f"alignkit: {why}: the reference is a frozen second copy of the base ({kind}, "
                         f"~{need / 2**30:.2f} GiB)")
