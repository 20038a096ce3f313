"""The rollout decoder (generation/decode.py), every sampling path's: the same tokens as transformers' generate,
its filters as transformers' warpers, its draws as often as their probabilities say, the log-probs of what it
sampled equal to a plain forward's (left padding, groups, LoRA, prompt and prefix tuning), EOS per row; and a
LoRA adapter merged for sampling (generation/merge.py) with the weights restored bit for bit."""
import pytest
import torch

from alignkit.forward.policy import response_forward
from alignkit.generation.decode import Sampling, decode, draw, filtered_logits
from alignkit.generation.merge import mergeable_layers, merged
from alignkit.generation.sample import generation_config, left_pad, sample_responses
from alignkit.train import prepare_run

from conftest import hf_generate, tiny_cfg


def tiny_policy(tmp_path, adapter: str, *overrides: str):
    run = prepare_run(tiny_cfg(tmp_path, "method=sft", f"adapter={adapter}", *overrides))
    torch.manual_seed(1)
    with torch.no_grad():  # move the adapter off its identity start so it matters
        for p in run.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    run.model.eval()
    prompts = [e["input_ids"][:12] for e in run.train_examples[:3]]
    prompts[1] = prompts[1][:7]  # different lengths: real left padding
    ids, attn = left_pad(prompts, run.tokenizer.pad_token_id, run.device)
    return run, prompts, ids, attn


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
def test_greedy_decoding_equals_generate(tmp_path, adapter):
    run, _, ids, attn = tiny_policy(tmp_path, adapter)
    s = Sampling(6, 0.0, 0, 1.0, eos=(), pad=run.tokenizer.pad_token_id)
    expected, _ = hf_generate(run.model, ids, attn, s)
    got, _ = decode(run.model, ids, attn, s)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
def test_sampled_logps_equal_a_plain_forward(tmp_path, adapter):
    run, prompts, ids, attn = tiny_policy(tmp_path, adapter)
    s = Sampling(max_new_tokens=7, temperature=0.7, top_k=20, top_p=0.9, eos=(), pad=run.tokenizer.pad_token_id)
    torch.manual_seed(0)
    full, full_attn, mask, _, logps = sample_responses(run.model, run.tokenizer, prompts, s, run.device, group=2,
                                                       logps=True)
    assert full.shape[0] == 6 and torch.equal(full[::2, :ids.shape[1]], ids)  # prompt b in rows 2b, 2b + 1
    with torch.no_grad():  # under logits / temperature, unfiltered: what PPO and GRPO recompute
        expected, _, _ = response_forward(run.model, full, full_attn, mask.shape[1], s.temperature)
    torch.testing.assert_close(logps, expected * mask, rtol=1e-4, atol=1e-4)
    assert mask.all()  # no EOS: every row ran 7 steps


def test_greedy_logps_are_the_raw_logits_and_the_first_step_is_generates(tmp_path):
    run, prompts, ids, attn = tiny_policy(tmp_path, "lora")
    s = Sampling(4, 0.0, 0, 1.0, eos=(), pad=run.tokenizer.pad_token_id)
    tokens, logps = decode(run.model, ids, attn, s)
    _, out = hf_generate(run.model, ids, attn, s, output_scores=True)
    expected = torch.stack([sc.float().log_softmax(-1).gather(-1, tokens[:, i:i + 1])[:, 0]
                            for i, sc in enumerate(out.scores)], 1)
    torch.testing.assert_close(logps, expected, rtol=1e-4, atol=1e-4)


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    s = Sampling(1, temperature=0.8, top_k=10, top_p=0.7, eos=(), pad=0)
    expected = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.8)(None, logits)))
    got = filtered_logits(logits, s)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_draws_follow_their_probabilities_and_never_take_a_filtered_token():
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.5]]).repeat(20000, 1)
    tokens = draw(probs, torch.Generator().manual_seed(0)).view(20000, 2)
    for row in range(2):
        freq = torch.bincount(tokens[:, row], minlength=6).float() / 20000
        assert (freq[probs[row] == 0] == 0).all()
        torch.testing.assert_close(freq, probs[row], rtol=0, atol=0.015)  # ~4 binomial std at 20k draws


def test_a_draw_rounded_up_to_the_total_takes_the_last_possible_token(monkeypatch):
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]).float()
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(shape))  # u = rand x total = the total
    assert draw(probs).tolist() == [1, 3]  # never a filtered token, never past the vocabulary


def test_rows_stop_at_their_eos_and_the_loop_ends_when_all_have():
    from alignkit.models.tiny import build_tiny_model

    model = build_tiny_model(64).eval()
    ids, attn = left_pad([[5, 6, 7], [8, 9]], 0, "cpu")
    free, _ = decode(model, ids, attn, Sampling(12, 0.0, 0, 1.0, eos=(), pad=0))
    assert free.shape == (2, 12)
    # each row's 3rd greedy token is one of the EOS ids (a list): both rows stop there, the loop after 3 steps
    eos = (int(free[0, 2]), int(free[1, 2]))
    tokens, logps = decode(model, ids, attn, Sampling(12, 0.0, 0, 1.0, eos=eos, pad=0))
    first_eos = [next(i for i, t in enumerate(row.tolist()) if t in eos) for row in free]
    assert tokens.shape[1] == max(first_eos) + 1
    for row, stop in enumerate(first_eos):
        assert torch.equal(tokens[row, :stop + 1], free[row, :stop + 1])
        assert (tokens[row, stop + 1:] == 0).all() and (logps[row, stop + 1:] == 0).all()


@pytest.mark.parametrize("adapter", ["lora", "dora", "loha"])
def test_merged_sampling_restores_the_weights_bit_for_bit_and_samples_the_same(tmp_path, adapter):
    run, prompts, ids, attn = tiny_policy(tmp_path, adapter)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in run.model.state_dict().items()}
    assert mergeable_layers(run.model)
    tuner_layers = mergeable_layers(run.model)
    assert bool(mergeable_layers(run.model, None)) == (adapter == "dora")  # null (auto): DoRA only
    assert mergeable_layers(run.model, False) == []
    s = Sampling(6, 0.0, 0, 1.0, eos=(), pad=run.tokenizer.pad_token_id)
    unmerged, unmerged_logps = decode(run.model, ids, attn, s)
    with merged(run.model, True):
        assert all(layer.merged for layer in tuner_layers) and not mergeable_layers(run.model)
        changed = [k for k, v in run.model.state_dict().items() if not torch.equal(v, before[k])]
        with merged(run.model, True):  # nested (GRPO's chunks inside one rollout): merged once
            tokens, logps = decode(run.model, ids, attn, s)
    assert any("base_layer.weight" in k for k in changed)  # merged: the base weights did change meanwhile
    assert torch.equal(tokens, unmerged)
    torch.testing.assert_close(logps, unmerged_logps, rtol=1e-5, atol=1e-5)
    after = run.model.state_dict()
    assert all(torch.equal(after[k], before[k]) and after[k].data_ptr() == pointers[k] for k in before)
    assert not any(layer.merged for layer in tuner_layers) and mergeable_layers(run.model)  # unmerged again
    with run.model.disable_adapter():  # the reference (adapter off) samples with the base as it is
        assert mergeable_layers(run.model) == []


@pytest.mark.parametrize("adapter", ["prompt", "qlora"])
def test_prompt_learning_and_quantised_adapters_are_not_merged(tmp_path, adapter):
    run = prepare_run(tiny_cfg(tmp_path, "method=sft", f"adapter={adapter}"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with merged(run.model, True):  # nothing merged: the weights as they were
        assert all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())


def test_sampling_settings_from_a_config_section(tiny_tokenizer):
    s = generation_config(tiny_tokenizer, 5, 0.0, top_k=7, top_p=0.5, merge=True)
    assert (s.top_k, s.top_p, s.merge, s.pad) == (0, 1.0, True, tiny_tokenizer.pad_token_id)  # greedy: no filters
    assert s.eos == (tiny_tokenizer.eos_token_id,)


@pytest.mark.parametrize("method,adapter", [("ppo", "lora"), ("grpo", "lora"), ("grpo", "dora")])
def test_merging_for_sampling_changes_no_number_of_a_run(tmp_path, method, adapter):
    from pathlib import Path

    from alignkit.train import execute

    from conftest import metrics

    functions = Path(__file__).parent / "rewards.py"
    reward = ("reward=gold",) if method == "ppo" else ("reward=functions", f"reward.functions=[{functions}:letters]")
    lines = []
    for merge in ("false", "null" if adapter == "dora" else "true"):  # null: DoRA merged, LoRA not
        run = prepare_run(tiny_cfg(tmp_path / str(merge), f"method={method}", f"adapter={adapter}", *reward,
                                   "method.max_new_tokens=5", "train.max_steps=3", "data.eval_fraction=0",
                                   "train.lr=0.05", f"method.merge_for_generation={merge}"))
        execute(run)
        lines.append(metrics(tmp_path / str(merge) / "run"))
    assert len(lines[0]) == 3
    for unmerged, merged_line in zip(*lines):  # the same samples, and the update on the same (restored) weights
        for key, value in unmerged.items():
            if isinstance(value, float) and not any(w in key for w in ("time", "per_s", "rss", "elapsed")):
                assert merged_line[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
