"""PPO: pure functions against hand-computed numbers; a tiny model learns a toy reward."""
import json
import math

import pytest
import torch

from alignkit.objectives.ppo import (adaptive_kl_coef, gae, kl_penalty, policy_loss, token_rewards, value_loss,
                                     whiten)
from alignkit.generation.sample import response_mask
from alignkit.train import execute, prepare_run

from conftest import patch_method, tiny_cfg


def test_gae_on_four_steps_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]])  # the padded last value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # gamma 1, lam 0.5, V after the last valid token = 0:
    # t2: delta = 2 + 0 - 1.5 = 0.5,             A = 0.5
    # t1: delta = 0 + 1.5 - 1.0 = 0.5,           A = 0.5 + 0.5 * 0.5  = 0.75
    # t0: delta = 1 + 1.0 - 0.5 = 1.5,           A = 1.5 + 0.5 * 0.75 = 1.875
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([1.875, 0.75, 0.5, 0.0])
    assert ret[0].tolist() == pytest.approx([2.375, 1.75, 2.0, 0.0])  # A + V, computed before whitening
    # gamma 0.9, lam 1, a single final reward: A = [0.81, 0.9, 1]
    adv, _ = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3), gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.81, 0.9, 1.0])


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([1.0, -1.0])
    # k3 = (e^{-k1} - 1) + k1: e^-1 - 1 + 1 = 0.367879; e^1 - 1 - 1 = 0.718282
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.exp(-1), math.e - 2], abs=1e-6)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k9")


def test_clipped_policy_loss_by_hand():
    logp, old = torch.tensor([[0.0, math.log(1.5)]]), torch.zeros(1, 2)
    adv, mask = torch.ones(1, 2), torch.ones(1, 2)
    # ratio [1, 1.5]; -A r = [-1, -1.5]; -A clip(r, 0.8, 1.2) = [-1, -1.2]; max = [-1, -1.2] -> mean -1.1
    loss, clipfrac, approxkl = policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-1.1)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approxkl.item() == pytest.approx(0.5 * math.log(1.5) ** 2 / 2)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    # clipped values [0.7, 0.3]; squared errors unclipped [1, 0], clipped [1.69, 0.09] -> 0.5 * mean(max) = 0.445
    loss, clipfrac = value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    assert loss.item() == pytest.approx(0.445)
    assert clipfrac.item() == pytest.approx(1.0)


def test_score_goes_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([3.0]), kl, kl_coef=0.5, mask=mask)
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1, -0.15 + 3.0, 0.0])


def test_whiten_and_adaptive_kl_by_hand():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4)
    sd = math.sqrt(5 / 3)  # unbiased variance of 1..4 is 5/3
    assert whiten(x, mask)[0].tolist() == pytest.approx([(v - 2.5) / sd for v in (1, 2, 3, 4)], abs=1e-5)
    assert whiten(x, mask, shift_mean=False)[0].tolist() == pytest.approx([(v - 2.5) / sd + 2.5 for v in (1, 2, 3, 4)],
                                                                          abs=1e-5)
    # e = clip(9/6 - 1, -0.2, 0.2) = 0.2; 0.1 * (1 + 0.2 * 10 / 100) = 0.102
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 100.0, 10) == pytest.approx(0.102)
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 100.0, 10) == pytest.approx(0.098)


def test_response_mask_stops_after_the_first_eos():
    resp = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    mask, has_eos = response_mask(resp, eos_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, False]


def count_letters(rows, texts):
    """Toy reward: how many ASCII letters the completion has (~1 in 6 byte tokens at random)."""
    return torch.tensor([float(sum(c.isascii() and c.isalpha() for c in t)) for t in texts])


def test_tiny_policy_learns_a_toy_reward(tmp_path):
    cfg = tiny_cfg(tmp_path, "method=ppo", "reward=gold", "train.max_steps=30", "train.batch_size=8",
                   "train.lr=1e-2", "method.max_new_tokens=10", "method.missing_eos_penalty=null",
                   "method.kl_coef=0.02", "method.temperature=1.0", "method.ppo_epochs=2", "data.eval_fraction=0",
                   # the random tiny model is near-uniform with tiny output weights: LoRA on lm_head too,
                   # so the policy can move its token distribution within a few steps
                   "adapter.target_modules=[lm_head,q_proj,v_proj]")
    run = prepare_run(cfg)
    run.reward_fn = count_letters
    summary = execute(run)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(x["objective/scores"] for x in lines[:5]) / 5
    last = sum(x["objective/scores"] for x in lines[-5:]) / 5
    assert last > first + 1.0, (first, last)
    assert all(math.isfinite(x["objective/kl"]) and x["objective/kl"] < 100 for x in lines)
    for key in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "policy/clipfrac", "policy/approxkl",
                "val/clipfrac", "loss/policy", "loss/value", "gen_tokens_per_s"):
        assert key in lines[-1]
    assert (tmp_path / "run" / "samples.jsonl").exists()
    assert (tmp_path / "run" / "final" / "value_head.safetensors").exists()
    assert summary["train_steps"] == 30


def test_reward_model_on_the_same_base_is_a_second_adapter(tmp_path):
    from alignkit.runs.reward import load_scorer, make_reward
    from alignkit.scoring.reward_model import as_completion

    rm_run = prepare_run(tiny_cfg(tmp_path / "rm", "method=rm", "train.max_steps=2"))
    execute(rm_run)
    rm_dir = tmp_path / "rm" / "run"
    run = prepare_run(tiny_cfg(tmp_path / "ppo", "method=ppo", f"reward.run={rm_dir}", "train.max_steps=2",
                               "method.max_new_tokens=6", "data.eval_fraction=0"))
    reward = make_reward(run.cfg, run.model, run.tokenizer, run.model_dir)
    assert set(run.model.peft_config) == {"default", "reward"}  # no second copy of the base
    rows = [e["row"] for e in run.train_examples[:3]]
    texts = ["12. The answer is 12.", "no idea", "7"]
    separate = load_scorer(rm_dir)([r["prompt"] for r in rows], [as_completion(r["prompt"], t) for r, t in zip(rows, texts)])
    torch.testing.assert_close(reward(rows, texts), separate, rtol=1e-5, atol=1e-5)
    assert run.model.active_adapter == "default"
    run.reward_fn = reward
    execute(run)
    final = tmp_path / "ppo" / "run" / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "reward").exists()


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
def test_rollout_logps_match_what_generate_sampled_from(tmp_path, adapter):
    """The training forward numbers positions as generate did (left padding, virtual tokens)."""
    from alignkit.forward.virtual import virtual_token_inputs
    from alignkit.generation.sample import left_pad
    from alignkit.forward.policy import add_value_head, response_forward

    run = prepare_run(tiny_cfg(tmp_path, "method=ppo", "reward=gold", f"adapter={adapter}"))
    model = run.model
    add_value_head(model, run.device)
    with torch.no_grad():  # move the adapter off its identity start so it matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    prompts = [e["prompt_ids"] for e in run.train_examples[:3]]
    prompts[1] = prompts[1][:-7]  # different lengths: real left padding
    ids, attn = left_pad(prompts, run.tokenizer.pad_token_id, run.device)
    module, inputs, _ = virtual_token_inputs(model, ids, attn)
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
                           pad_token_id=run.tokenizer.pad_token_id, eos_token_id=None, use_cache=True)
    with torch.no_grad():
        out = module.generate(**inputs, generation_config=gen)
        seqs = out.sequences if "input_ids" in inputs else torch.cat([ids, out.sequences], 1)
        resp = seqs[:, -5:]
        expected = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, resp[:, i:i + 1]).squeeze(-1)
                                for i, s in enumerate(out.scores)], 1)
        got, _, _ = response_forward(model, seqs, torch.cat([attn, torch.ones_like(resp)], 1), 5, temperature=1.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task_size,minibatches,sizes", [
    (7, 2, [[2, 2], [2, 1]]),      # 4 then a short last batch of 3: every row, 2 + 1
    (5, 3, [[2, 1, 1], [1]]),      # 4 then 1 row: the two empty minibatches are skipped, not a NaN
])
def test_every_rollout_row_is_used_in_each_ppo_epoch(tmp_path, monkeypatch, task_size, minibatches, sizes):
    from alignkit.methods import METHODS

    seen = []
    real = METHODS["ppo"].step

    def recording(model, mb, denominator, method):
        seen.append(mb["ids"].shape[0])
        return real(model, mb, denominator, method)

    patch_method(monkeypatch, "ppo", step=recording)
    run = prepare_run(tiny_cfg(tmp_path, "method=ppo", "reward=gold", f"data.task_size={task_size}",
                               "data.eval_fraction=0", "train.batch_size=4", "train.max_steps=2",
                               f"method.num_minibatches={minibatches}", "method.ppo_epochs=2",
                               "method.max_new_tokens=4"))
    summary = execute(run)
    # per step, ppo_epochs passes, each over every rollout row
    assert seen == sizes[0] * 2 + sizes[1] * 2
    assert math.isfinite(summary["loss/policy"]) and summary["skipped_steps"] == 0
