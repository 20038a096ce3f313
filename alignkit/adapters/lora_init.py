"""The LoRA inits that need more than a peft config: data (EVA), the original weights (LoftQ on the
4-bit base), and a frozen copy of an initial adapter that is not zero.

PiSSA and OLoRA move sBA out of each weight (the base keeps W - sBA), and LoftQ starts sBA at
W - dequant(Q(W)): with its adapter switched off the model is then not the one training started
from. The reference policy (DPO, PPO, eval) must be that starting model, so a frozen copy of the
initial adapter is kept as a second adapter, REFERENCE, and reference.reference_mode() switches to it.
"""
from __future__ import annotations

import copy

import torch

from .lora_rules import starts_nonzero
from .reference import REFERENCE


def finish_init(model, adapter):
    """After get_peft_model: the quantisation-aware init, then the reference copy (EVA, which needs the training
    batches, runs after attaching: lora.eva_init)."""
    if adapter.init == "loftq":
        loftq_init(model)
    if starts_nonzero(adapter.init):
        keep_initial_adapter(model)
    return model


def eva_init(model, batches) -> None:
    """EVA (Paischer et al. 2024): A from the SVD of each layer's inputs on the training batches (peft).

    Every process passes the same batches, so they agree on the init without gathering."""
    from peft import initialize_lora_eva_weights

    if not batches:
        raise ValueError("adapter.init=eva needs the training batches")
    initialize_lora_eva_weights(model, dataloader=list(batches), show_progress_bar=False,
                                gather_distributed_inputs=False)


@torch.no_grad()
def loftq_init(model) -> None:
    """LoftQ (Li et al. 2023), one step, on the 4-bit base: s·B·A = the rank-r SVD of W - dequant(Q(W)),
    W read from the base's safetensors. So the model starts next to the full-precision W.

    peft's replace_lora_weights_loftq does this on CUDA only (the device is hard-coded) and leaves out
    the LoRA scaling s (peft#1982: right only when alpha = r); this uses its loader and its SVD split.
    DoRA's magnitude is then recomputed as |W_q + sBA| per column, so the DoRA model starts there too.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    loader = _SafetensorLoader(model, model.get_base_model().name_or_path)
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        q = module.get_base_layer().weight
        weight = loader.get_tensor(name[len(prefix):] + ".weight").to(q.device, torch.float32)
        residual = weight - bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
        parts = _low_rank_decomposition(residual, reduced_rank=module.r["default"])
        root = module.scaling["default"] ** 0.5
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        a.copy_((parts["R"] / root).to(a.dtype))
        b.copy_((parts["L"] / root).to(b.dtype))
        if module.use_dora["default"]:
            module.lora_magnitude_vector["default"].update_layer(
                base_layer=module.get_base_layer(), lora_A=a, lora_B=b, scaling=module.scaling["default"])


def keep_initial_adapter(model) -> None:
    """A frozen copy of the "default" adapter as it is now, as adapter REFERENCE (not active)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = True  # a plain LoRA of these weights: no init may touch the base again
    config.inference_mode = True
    model.add_adapter(REFERENCE, config)
    set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name="default"),
                              adapter_name=REFERENCE)
    for name, p in model.named_parameters():
        if f".{REFERENCE}." in name:
            p.requires_grad_(False)
