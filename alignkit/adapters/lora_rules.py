"""LoRA's adapter.init values and what each does to the base: read by the LoRA adapter, its inits and the
reference (kept apart so those modules need not import each other)."""
from __future__ import annotations

import re

# adapter.init (peft's init_lora_weights; `default` is peft's True: A kaiming-uniform, B = 0)
INIT = re.compile(r"^(default|gaussian|pissa|pissa_niter_[1-9][0-9]*|olora|loftq|eva)$")
INIT_CHOICES = "default, gaussian, pissa, pissa_niter_K (K >= 1), olora, loftq, eva"


def moves_base(init: str) -> bool:
    """Inits that change the base weights (PiSSA, OLoRA): final/ is converted to apply to the original base."""
    return init.startswith("pissa") or init == "olora"


def starts_nonzero(init: str) -> bool:
    """Inits whose adapter is not zero at step 0: the reference is a frozen copy of the initial adapter."""
    return moves_base(init) or init == "loftq"
