"""BitDelta (Liu et al. 2024): a fine-tune as one sign bit per weight of its delta plus one scale
per matrix, with the scales distilled against the fine-tuned model.

    alignkit compress base=PATH finetuned=PATH       # or: alignkit train adapter=bitdelta
    from alignkit.bitdelta import apply               # base + artifact -> fine-tuned model
"""
from .apply import apply, attach_deltas, use_delta
from .artifact import load_artifact, save_artifact
from ..models.blocks import block_linears
from .compress import Delta, binarize
from .pack import pack_signs, reconstruct, unpack_signs

__all__ = ["Delta", "apply", "attach_deltas", "binarize", "block_linears", "load_artifact", "pack_signs",
           "reconstruct", "save_artifact", "unpack_signs", "use_delta"]
