"""Which method x adapter pairs exist: the single source of truth."""
from __future__ import annotations

from ..errors import UsageError

# method -> adapters it runs with
VALID = {
    "sft": ("prompt", "prefix", "lora", "qlora", "full", "bitdelta"),
    "dpo": ("prompt", "prefix", "lora", "qlora", "full", "bitdelta"),
    "rm": ("prompt", "prefix", "lora", "qlora", "full"),
    # one base copy: the reference is the base with adapters off, so no full fine-tune
    "ppo": ("prompt", "prefix", "lora", "qlora"),
}


# the model head each method trains: "lm" (causal LM) unless listed
HEAD = {"rm": "score"}


def check_combination(method: str, adapter: str) -> None:
    if method not in VALID:
        raise UsageError(f"unknown method '{method}' (choose from {', '.join(VALID)})")
    if adapter not in VALID[method]:
        raise UsageError(
            f"method={method} does not run with adapter={adapter} "
            f"(valid adapters for {method}: {', '.join(VALID[method])}; see `alignkit list`)"
        )
