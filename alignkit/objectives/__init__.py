"""Pure loss functions of tensors."""
from .dpo import dpo_loss
from .logps import token_logps
from .sft import sft_loss

__all__ = ["dpo_loss", "sft_loss", "token_logps"]
