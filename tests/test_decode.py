"""The rollout decoder: the same tokens as transformers' generate, its filters as transformers' warpers, and the
log-probs of what it sampled equal to a plain forward's (left padding, LoRA, prompt and prefix tuning)."""
import pytest
import torch

from alignkit.forward.policy import response_forward
from alignkit.generation.decode import Sampling, decode, filtered_logits
from alignkit.generation.sample import left_pad, new_tokens
from alignkit.train import prepare_run

from conftest import tiny_cfg


def tiny_policy(tmp_path, adapter: str):
    run = prepare_run(tiny_cfg(tmp_path, "method=sft", f"adapter={adapter}", "adapter.num_virtual_tokens=3"
                               if adapter in ("prompt", "prefix") else "train.seed=42"))
    torch.manual_seed(1)
    with torch.no_grad():  # move the adapter off its identity start so it matters
        for p in run.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    run.model.eval()
    prompts = [e["input_ids"][:12] for e in run.train_examples[:3]]
    prompts[1] = prompts[1][:7]  # different lengths: real left padding
    ids, attn = left_pad(prompts, run.tokenizer.pad_token_id, run.device)
    return run, ids, attn


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
def test_greedy_decoding_equals_generate(tmp_path, adapter):
    from transformers import GenerationConfig

    run, ids, attn = tiny_policy(tmp_path, adapter)
    gen = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=run.tokenizer.pad_token_id,
                           eos_token_id=None, use_cache=True)
    with torch.no_grad():
        expected = new_tokens(run.model, ids, attn, gen)
    got, _ = decode(run.model, ids, attn, Sampling(6, 0.0, 0, 1.0), eos_id=-1, pad_id=run.tokenizer.pad_token_id)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
def test_sampled_logps_equal_a_plain_forward(tmp_path, adapter):
    run, ids, attn = tiny_policy(tmp_path, adapter)
    s = Sampling(max_new_tokens=7, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(0)
    tokens, logps = decode(run.model, ids, attn, s, eos_id=-1, pad_id=run.tokenizer.pad_token_id)
    full = torch.cat([ids, tokens], 1)
    with torch.no_grad():
        expected, _, _ = response_forward(run.model, full, torch.cat([attn, torch.ones_like(tokens)], 1),
                                          tokens.shape[1], s.temperature)
    torch.testing.assert_close(logps, expected, rtol=1e-4, atol=1e-4)


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    s = Sampling(1, temperature=0.8, top_k=10, top_p=0.7)
    expected = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.8)(None, logits)))
    got = filtered_logits(logits, s)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_rows_stop_at_their_eos_and_the_loop_ends_when_all_have():
    from alignkit.models.tiny import build_tiny_model

    model = build_tiny_model(64).eval()
    ids, attn = left_pad([[5, 6, 7], [8, 9]], 0, "cpu")
    tokens, _ = decode(model, ids, attn, Sampling(12, 0.0, 0, 1.0), eos_id=-1, pad_id=0)
    first = tokens[:, 0]  # greedy: make each row's first token its EOS, then the decoder stops after one step
    eos = int(first[0])
    row1, _ = decode(model, ids, attn, Sampling(12, 0.0, 0, 1.0), eos_id=eos, pad_id=0)
    assert row1[0, 0] == eos and (row1[0, 1:] == 0).all()  # after its EOS a row holds pads
    if int(first[1]) == eos:
        assert row1.shape[1] == 1  # every row done: no further step
