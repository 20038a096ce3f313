"""What an adapter is and can do: one record per adapter, read by loading, validation, the methods and the CLI."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Adapter:
    name: str
    schema: type                  # the adapter.* dataclass; its values live in configs/adapter/NAME.yaml
    attach: Callable              # (model, adapter cfg, train cfg, task "CAUSAL_LM" | "SEQ_CLS") -> trainable model
    trains_base: bool = False     # trains the base weights (fp32 master weights under dtype=auto; no adapter to
                                  # switch off, so a reference is precomputed before training)
    virtual_tokens: bool = False  # prompt/prefix: padded batches only (no packing), no gradient checkpointing mix
    switchable: bool = False      # peft layers that several adapters can share on one base (a reward model next
                                  # to the policy)
    four_bit: bool = False        # the base is loaded in 4 bits (bitsandbytes NF4)
    fsdp: bool = True             # runs under train.strategy=fsdp
    fsdp_why: str = ""            # why not, when it doesn't
    final: str = "model"          # what final/ holds: "model" (peft dir or full model) | "bitdelta" (1-bit artifact)
    check: Callable | None = None  # (cfg, verb) -> None; raises UsageError
    mergeable: bool = False       # folds into the base weights: `alignkit export` and policy.init give a plain model
                                  # (no inference latency); prompt/prefix's virtual tokens are inputs, not weights
    loraplus: bool = False        # has LoRA's B matrices, which train.loraplus_lr_ratio (LoRA+) speeds up
    data_init: Callable | None = None  # (model, adapter cfg, batches) -> None: the part of an init that learns from
                                       # the training batches (LoRA's init=eva); batches() builds them when called
    keeps_base: Callable = lambda adapter_cfg: True  # whether the base weights stay as loaded (PiSSA/OLoRA move part
                                                     # of them into the adapter), so a reward model's adapter trained
                                                     # on that base may share it
    presets: tuple[str, ...] = ()  # adapter options whose YAML builds on this one's (adapter.name stays this one's)
