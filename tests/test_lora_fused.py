"""The fused LoRA linear (adapters/lora_fused.py) against peft's own forward: same outputs and gradients, the
recomputation it skips under checkpointing, and the cases it leaves to peft."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignkit.adapters import lora_fused


def lora_model(fused: bool, checkpointed: bool, bias: bool = False, **lora):
    """The tiny Llama (biases in every linear when `bias`) with LoRA r=4 on all linears and a random B."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(config)
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    if fused:
        assert lora_fused.fuse_lora(model, checkpointed) == 14  # 7 linears x 2 layers
    model.train()
    return model


def loss_and_grads(model, dtype=None):
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (3, 11))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_gives_peft_s_loss_and_gradients(checkpointed, bias):
    loss, grads = loss_and_grads(lora_model(True, checkpointed, bias))
    ref_loss, ref_grads = loss_and_grads(lora_model(False, checkpointed, bias))
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fused_lora_under_bf16_autocast_is_peft_s_up_to_bf16_rounding():
    loss, grads = loss_and_grads(lora_model(True, True), torch.bfloat16)
    ref_loss, ref_grads = loss_and_grads(lora_model(False, True), torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in grads.values())
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=2e-2)
    for name, grad in grads.items():
        assert torch.nn.functional.cosine_similarity(grad.flatten(), ref_grads[name].flatten(), dim=0) > 0.99, name


class ProductsWith(TorchDispatchMode):
    """Counts the matrix products that read a given weight's storage."""

    def __init__(self, *weights):
        super().__init__()
        self.ptrs = {w.untyped_storage().data_ptr(): i for i, w in enumerate(weights)}
        self.counts = [0] * len(weights)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            for a in args:
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.ptrs:
                    self.counts[self.ptrs[a.untyped_storage().data_ptr()]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused,down_products", [(False, 3), (True, 2)])
def test_checkpointing_no_longer_recomputes_a_layer_s_last_frozen_product(fused, down_products):
    """Layer 1's down projection (its last linear) reads W in the forward and for the input gradient; peft's
    order also recomputes it. The query projection is recomputed either way (attention needs it)."""
    model = lora_model(fused, checkpointed=True)
    layer = model.base_model.model.model.layers[1]
    weights = layer.mlp.down_proj.base_layer.weight, layer.self_attn.q_proj.base_layer.weight
    with ProductsWith(*weights) as count:
        loss_and_grads(model)
    assert count.counts == [down_products, 3]


@pytest.mark.parametrize("case", ["dropout", "dora", "disabled", "merged", "bf16 base"])
def test_what_the_fused_path_leaves_to_peft(monkeypatch, case):
    """Each case runs peft's forward (the fused ops would fail here) and gives peft's numbers."""
    def refuse(*args):
        raise AssertionError("fused path taken")

    lora = {"lora_dropout": 0.1} if case == "dropout" else {"use_dora": True} if case == "dora" else {}
    fused, plain = lora_model(True, False, **lora), lora_model(False, False, **lora)
    if case == "bf16 base":
        fused, plain = fused.bfloat16(), plain.bfloat16()
        for model in (fused, plain):
            for name, p in model.named_parameters():
                p.data = p.data.float() if "lora_" in name else p.data
    ids = torch.randint(0, 64, (2, 7))

    def logits(model):
        torch.manual_seed(2)
        if case == "disabled":
            with model.disable_adapter():
                return model(input_ids=ids).logits
        if case == "merged":
            model.merge_adapter()
        return model(input_ids=ids).logits

    expected = logits(plain)
    monkeypatch.setattr(lora_fused._Fused, "apply", refuse)
    monkeypatch.setattr(lora_fused._Delta, "apply", refuse)
    torch.testing.assert_close(logits(fused), expected, rtol=0, atol=0)
