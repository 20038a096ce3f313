"""Pure loss functions of tensors."""
from .dpo import dpo_loss, hinge_loss, ipo_loss, simpo_loss
from .kto import kl_point, kto_loss
from .logps import token_logps
from .orpo import log1mexp, odds_ratio_loss
from .reward import bradley_terry_loss
from .sft import sft_loss

__all__ = ["bradley_terry_loss", "dpo_loss", "hinge_loss", "ipo_loss", "kl_point", "kto_loss", "log1mexp",
           "odds_ratio_loss", "simpo_loss", "sft_loss", "token_logps"]
