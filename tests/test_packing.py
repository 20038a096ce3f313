"""Padding-free packing: the layout, and log-probs identical to plain one-sequence-at-a-time forwards."""
from __future__ import annotations

import random

import pytest
import torch

from alignkit.data.collate import collate_preference, collate_sft
from alignkit.data.packing import first_fit, pack, unit_places
from alignkit.forward.logps import counted_token_logps, sequence_logps
from alignkit.forward.packed import can_pack, head_logps


def seq(prompt: list[int], answer: list[int]) -> dict:
    return {"input_ids": prompt + answer, "completion_mask": [0] * len(prompt) + [1] * len(answer)}


@torch.no_grad()
def plain_logp(model, s: dict) -> float:
    """Summed log-prob of one sequence's counted tokens: a lone forward, float64 log-softmax."""
    ids = torch.tensor([s["input_ids"]])
    logits = model(input_ids=ids).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float((lp * torch.tensor(s["completion_mask"][1:])).sum())


def random_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    out = []
    for _ in range(n):
        p = words(rng.randint(2, 12))
        out.append({"chosen": seq(p, words(rng.randint(1, 9))), "rejected": seq(p, words(rng.randint(1, 9)))})
    return out


def test_unit_layout_shares_the_prompt_and_restarts_positions():
    ids, places = unit_places([seq([5, 6, 7], [8, 9]), seq([5, 6, 7], [10])])
    assert ids == [5, 6, 7, 8, 9, 10]
    assert places == [[0, 1, 2, 3, 4], [0, 1, 2, 5]]
    # different prompts share nothing but the common start
    ids, places = unit_places([seq([5, 6], [8]), seq([5, 7], [9])])
    assert ids == [5, 6, 8, 7, 9] and places == [[0, 1, 2], [0, 3, 4]]


def test_first_fit_decreasing():
    # width 5; longest first: 5 -> row 0, 4 -> row 1, 3 -> row 2, 2 -> row 2 after the 3, 1 -> row 1 after the 4
    assert first_fit([5, 2, 3, 4, 1]) == ([(0, 0), (2, 3), (2, 0), (1, 0), (1, 4)], 3, 5)


def test_mask_hides_chosen_from_rejected():
    p = pack([[seq([5, 6], [7, 8]), seq([5, 6], [9])]], pad_id=0)
    m = p["mask"][0, 0].int()
    # layout 5 6 7 8 9: the rejected token (place 4) sees the prompt (0, 1) and itself, not 7 8
    assert m[4].tolist() == [1, 1, 0, 0, 1]
    assert m[3].tolist() == [1, 1, 1, 1, 0]
    assert p["position_ids"][0].tolist() == [0, 1, 2, 3, 2]
    # counted tokens: 7 (predicted at place 1), 8 (at 2) for chosen; 9 (at 1) for rejected
    assert p["pred"].tolist() == [1, 2, 1] and p["target"].tolist() == [7, 8, 9]
    assert p["owner"].tolist() == [0, 0, 1] and p["tokens"].tolist() == [2, 1]


@pytest.fixture(scope="module")
def tiny_model():
    from alignkit.models.tiny import build_tiny_model

    return build_tiny_model(vocab_size=64).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_pair_logps_equal_lone_forwards(tiny_model, attn):
    tiny_model.config._attn_implementation = attn
    pairs = random_pairs(7, 64)
    batch = collate_preference(pairs, pad_id=0, packed=True)
    assert batch["packed"]["input_ids"].numel() < batch["input_ids"].numel()  # less than padded
    assert_packed_equals_padded_and_lone(tiny_model, pairs, batch)
    tiny_model.config._attn_implementation = "sdpa"


def assert_packed_equals_padded_and_lone(model, pairs, batch):
    """Packed log-probs == padded ones == lone unpadded forwards of each sequence (fp64 log-softmax)."""
    assert can_pack(model)
    with torch.no_grad():
        packed, tokens = sequence_logps(model, batch)
        padded, tokens_padded = sequence_logps(model, {k: v for k, v in batch.items() if k != "packed"})
    expect = [plain_logp(model, e[side]) for side in ("chosen", "rejected") for e in pairs]
    torch.testing.assert_close(packed.double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert tokens.tolist() == tokens_padded.tolist()
    return packed


def test_packed_gradients_equal_padded(tiny_model):
    """The same loss through packed and padded batches gives the same gradient."""
    pairs = random_pairs(5, 64, seed=1)
    batch = collate_preference(pairs, pad_id=0, packed=True)
    grads = []
    for b in (batch, {k: v for k, v in batch.items() if k != "packed"}):
        tiny_model.zero_grad()
        lp, _ = sequence_logps(tiny_model, b)
        (lp[:5] - 0.5 * lp[5:]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_packed_sft_token_logps(tiny_model):
    examples = [e["chosen"] for e in random_pairs(6, 64, seed=2)]
    batch = collate_sft(examples, pad_id=0, packed=True)
    with torch.no_grad():
        lp, mask = counted_token_logps(tiny_model, batch)
    assert lp.shape == mask.shape == (batch["count"],)
    expect = sum(plain_logp(tiny_model, e) for e in examples)
    assert float(lp.sum()) == pytest.approx(expect, rel=1e-5)


def test_head_logps_chunks_and_gradient():
    """Chunked head == full log-softmax, values and gradients (hidden and head weight)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    h = torch.randn(37, 8, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    import alignkit.forward.packed as packed_mod

    old = packed_mod.HEAD_CHUNK_ELEMENTS
    packed_mod.HEAD_CHUNK_ELEMENTS = 50 * 10  # 10 rows per chunk: 4 chunks
    try:
        ours = head_logps(h, head, t)
        ours.sum().backward()
    finally:
        packed_mod.HEAD_CHUNK_ELEMENTS = old
    g_h, g_w = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    ref = torch.log_softmax(head(h), -1).gather(-1, t[:, None])[:, 0]
    ref.sum().backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_h, h.grad)
    torch.testing.assert_close(g_w, head.weight.grad)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_frozen_head_gets_its_gradient_in_the_forward(monkeypatch, precision):
    """A frozen head (LoRA, prompt/prefix): the log-probs are those of a plain log-softmax and the gradient with
    respect to the hidden rows is autograd's, over several chunks, with a bias and a weighted loss; in bf16
    autocast as close to autograd's own bf16 gradient as two bf16 roundings allow. The backward never
    recomputes the head (the head is not called again)."""
    import alignkit.forward.packed as packed_mod

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50).requires_grad_(False)
    h = torch.randn(37, 8, requires_grad=True)
    t, w = torch.randint(0, 50, (37,)), torch.randn(37)
    monkeypatch.setattr(packed_mod, "HEAD_CHUNK_ELEMENTS", 50 * 10)  # 10 rows per chunk: 4 chunks
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        ours = head_logps(h, head, t)
        calls = []
        monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(a))
        (ours * w).sum().backward()
        monkeypatch.undo()
        g_ours, h.grad = h.grad.clone(), None
        ref = torch.log_softmax(head(h).float(), -1).gather(-1, t[:, None])[:, 0]
        (ref * w).sum().backward()
    assert calls == [] and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.detach())
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(g_ours, h.grad, **tol)
    with torch.no_grad():  # no gradient wanted: none computed
        assert not head_logps(h, head, t).requires_grad


def windowed_model(kind: str):
    """A tiny Mistral with a 4-token sliding window, or a tiny Qwen2 whose layers alternate sliding / full."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, sliding_window=4)
    torch.manual_seed(0)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(num_hidden_layers=2, **common)).eval()
    config = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, max_window_layers=0,
                         layer_types=["sliding_attention", "full_attention"], **common)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2-mixed"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded_with_a_sliding_window(kind, attn):
    """Sequences longer than the window: each token sees only its last 4 positions, packed or padded."""
    model = windowed_model(kind)
    model.config._attn_implementation = attn
    pairs = random_pairs(6, 64, seed=3)
    assert max(len(e["chosen"]["input_ids"]) for e in pairs) > 8  # well past the window
    batch = collate_preference(pairs, pad_id=0, packed=True)
    packed = assert_packed_equals_padded_and_lone(model, pairs, batch)
    # and the window matters here: without it the packed numbers differ
    full = model.config.sliding_window
    model.config.sliding_window = None
    model.config.layer_types = ["full_attention"] * 2
    with torch.no_grad():
        unwindowed, _ = sequence_logps(model, batch)
    model.config.sliding_window = full
    assert (unwindowed - packed).abs().max() > 1e-3


def test_packed_equals_padded_with_lora_on_the_lm_head(tiny_model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(build_copy(tiny_model), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    with torch.no_grad():  # B = 0 at init: move it so the head's LoRA delta changes the numbers
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pairs = random_pairs(5, 64, seed=4)
    batch = collate_preference(pairs, pad_id=0, packed=True)
    assert can_pack(model)
    grads = []
    for b in (batch, {k: v for k, v in batch.items() if k != "packed"}):
        model.zero_grad()
        lp, _ = sequence_logps(model, b)
        lp.sum().backward()
        grads.append((lp.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)
    with torch.no_grad(), model.disable_adapter():
        base, _ = sequence_logps(model, batch)
    assert (base - grads[0][0]).abs().max() > 1e-2  # the head's adapter is in the packed numbers


def build_copy(model):
    import copy

    return copy.deepcopy(model)
