"""The inputs that carry prompt and prefix tuning's virtual tokens into a forward or generate call.

alignkit builds them itself instead of calling peft's forward, because peft 0.21 passes the prefix as
`past_key_values` and reads `cache_position`, which transformers 5.x renamed and removed: a prefix-tuned
sequence classifier then refuses to run ("Model does not support past key values") and generation with
either adapter feeds the virtual tokens wrongly once the KV cache is in use.
"""
from __future__ import annotations

import inspect

import torch


def is_prompt_learning(model) -> bool:
    """A peft model whose active adapter is prompt or prefix tuning (enabled or not)."""
    from peft import PeftModel

    return isinstance(model, PeftModel) and model.peft_config[model.active_adapter].is_prompt_learning


def cache_argument(module) -> str:
    """The forward argument a KV cache goes in: `cache` since transformers renamed `past_key_values`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def virtual_token_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(module, kwargs, n): `module(**kwargs)` (or `.generate`) runs `model` on these tokens.

    Prompt tuning: inputs_embeds = [P; embed(ids)], so outputs carry n = num_virtual_tokens extra
    positions in front (logits are n + T long). Prefix tuning: the K/V prefix goes in the cache
    and outputs keep the input's length (n = 0). Both extend the attention mask by n ones on the
    left. Any other model: itself; a prompt-learning one inside `disable_adapter()`: its base; n = 0.
    """
    plain = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not is_prompt_learning(model):
        return model, plain, 0
    base = model.get_base_model()
    if not model.has_active_enabled_adapter:  # inside disable_adapter(): the base model alone
        return base, plain, 0
    config = model.active_peft_config
    batch, n = input_ids.shape[0], config.num_virtual_tokens
    mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
    if config.peft_type == "PREFIX_TUNING":
        return base, {"input_ids": input_ids, "attention_mask": mask, cache_argument(base): model.get_prompt(batch)}, 0
    if config.peft_type != "PROMPT_TUNING":
        raise NotImplementedError(f"peft {config.peft_type} adapters are not supported")
    embeds = base.get_input_embeddings()(input_ids)
    prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
    return base, {"inputs_embeds": torch.cat([prompts, embeds], dim=1), "attention_mask": mask}, n


def input_positions(x: torch.Tensor, length: int, virtual: int) -> torch.Tensor:
    """(B, virtual + length, ...) -> (B, length, ...): drop the positions of prompt tuning's soft tokens.

    Any other length is an error, never a silent shift of the alignment.
    """
    if x.shape[1] != virtual + length:
        raise RuntimeError(f"model output covers {x.shape[1]} positions; expected {length} input positions "
                           f"after {virtual} virtual tokens")
    return x[:, virtual:]
