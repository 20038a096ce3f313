"""Where a loaded model's transformer blocks are: found by structure, not by Llama-style names."""
from __future__ import annotations

from torch import nn

from ..errors import UsageError


def block_linears(model: nn.Module) -> list[str]:
    """Module names of the nn.Linear layers inside the transformer blocks.

    The blocks are the ModuleList with the most parameters among those whose every entry holds an
    nn.Linear: the decoder layers (model.layers, transformer.h, gpt_neox.layers, ...).
    """
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise UsageError(f"{type(model).__name__}: no transformer blocks with nn.Linear layers found "
                         f"(BitDelta compresses the nn.Linear weights inside the decoder layers)")
    return [n for n, m in model.named_modules() if n.startswith(f"{best}.") and isinstance(m, nn.Linear)]
