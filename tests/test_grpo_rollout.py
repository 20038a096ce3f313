"""Group rollouts (one prefill per group), reward functions as TRL calls them, dynamic sampling, the update's
chunking and its reuse of one generation (tiny model)."""
import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.forward.policy import completions_logps, response_forward
from alignkit.generation.sample import generation_config, left_pad, response_mask, sample_responses
from alignkit.methods import critic_free
from alignkit.scoring.functions import functions_reward
from alignkit.train import execute, prepare_run

from conftest import hf_generate, metrics, patch_method, tiny_cfg
from grpo_fixed import fixed_completions

REWARDS = Path(__file__).parent / "rewards.py"
LETTERS = ("reward=functions", f"reward.functions=[{REWARDS}:letters]")


def perturbed_run(tmp_path, adapter):
    run = prepare_run(tiny_cfg(tmp_path, "method=grpo", f"adapter={adapter}", *LETTERS))
    with torch.no_grad():  # move the adapter off its identity start so it matters
        for p in run.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    prompts = [e["prompt_ids"] for e in run.train_examples[:3]]
    prompts[1] = prompts[1][:-7]  # different lengths: real left padding
    return run, prompts


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
def test_a_group_shares_one_prompt_prefill_and_samples_as_separate_prefills_do(tmp_path, adapter):
    run, prompts = perturbed_run(tmp_path, adapter)
    model, tok, group = run.model, run.tokenizer, 3
    padded, pad_mask = left_pad(prompts, tok.pad_token_id, run.device)
    greedy = generation_config(tok, 6, 0.0, 0, 1.0)
    greedy.eos = ()
    separate, _ = hf_generate(model, padded.repeat_interleave(group, 0), pad_mask.repeat_interleave(group, 0), greedy)
    greedy.eos = (int(separate[0, 2]),)  # a token some rows emit early: those stop there
    expected_mask = response_mask(separate, greedy.eos)[0]
    embedded = []  # (rows, tokens) of every forward's token embedding
    hook = model.get_base_model().get_input_embeddings().register_forward_hook(
        lambda m, args, out: embedded.append(tuple(args[0].shape)))
    ids, attn, mask, has_eos = sample_responses(model, tok, prompts, greedy, run.device, group)
    hook.remove()
    # the 3 prompts once (not 3 x 3 times), then one token per running row and step; stopped rows are not run on
    assert embedded[0] == (3, max(map(len, prompts))) and all(s[1] == 1 for s in embedded[1:])
    running = expected_mask * (separate != greedy.eos[0])  # rows still going after each step's token
    assert [s[0] for s in embedded[1:]] == running.sum(0)[:len(embedded) - 1].tolist()
    assert torch.equal(ids[:, -mask.shape[1]:], separate[:, :mask.shape[1]].masked_fill(
        expected_mask[:, :mask.shape[1]] == 0, tok.pad_token_id))
    assert torch.equal(has_eos, expected_mask.sum(-1) < 6) and has_eos[0]

    torch.manual_seed(0)
    sampled = generation_config(tok, 5, 0.7, 0, 1.0)
    ids, attn, mask, _, drawn = sample_responses(model, tok, prompts, sampled, run.device, group, logps=True)
    with torch.no_grad():
        # every token is drawn from logits / temperature given the tokens before it: what a plain forward of
        # prompt + completion gives; the first one from the distribution G separate prefills give
        plain = response_forward(model, ids, attn, mask.shape[1], temperature=0.7)[0]
        sampled.max_new_tokens = 1
        first = hf_generate(model, padded.repeat_interleave(group, 0), pad_mask.repeat_interleave(group, 0), sampled,
                            output_scores=True)[1].scores[0]
    torch.testing.assert_close(drawn, plain * mask, rtol=1e-4, atol=1e-4)
    first_logp = torch.log_softmax(first.float(), -1).gather(-1, ids[:, -mask.shape[1]:][:, :1]).squeeze(1)
    torch.testing.assert_close(drawn[:, 0], first_logp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
def test_each_prompt_runs_once_in_the_update_with_the_numbers_and_gradients_of_whole_rows(tmp_path, adapter):
    run, prompts = perturbed_run(tmp_path, adapter)
    ctx = fake_ctx_of(run)
    completions = [{"prompt": p, "response": r, "truncated": False} for p in prompts
                   for r in ([7, 8, 9, 10], [11, 12], [13])]
    del completions[4]  # a prompt need not have all its completions in a micro-batch
    results = []
    for shared in (True, False):
        mb = critic_free.micro_batch(ctx, completions)
        mb["shared"] = shared
        run.model.zero_grad()
        logp, entropy = completions_logps(run.model, mb, temperature=0.7)
        ((logp * mb["mask"]).sum() + (logp * mb["mask"]).pow(2).sum()).backward()
        results.append((logp * mb["mask"], entropy * mb["mask"],
                        [p.grad.clone() for p in run.model.parameters() if p.requires_grad]))
    assert mb["prompt_ids"].shape[0] == 3 and mb["owner"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)
    for shared, whole in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(shared, whole, rtol=1e-4, atol=1e-6)


def test_reward_functions_get_trls_arguments_and_none_leaves_one_out(tmp_path):
    reward = functions_reward([f"{REWARDS}:sees_columns", f"{REWARDS}:none_for_odd", "correct_answer",
                               f"{REWARDS}:letters"])
    rows = [{"prompt": [{"role": "user", "content": "q"}], "answer": 4, "chosen": "c", "completion": "x"}] * 4
    texts = ["Answer: 4", "so\nAnswer: 5", "abc", "Answer: 4."]
    out = reward(rows, texts, completion_ids=[[1, 2], [3], [4], [5]])
    assert list(out) == ["sees_columns", "none_for_odd", "correct_answer", "letters"]
    assert out["sees_columns"].tolist() == [1.0] * 4 and out["correct_answer"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out["none_for_odd"][0] == 1.0 and math.isnan(out["none_for_odd"][1])
    # the same function named twice is logged twice, under two names
    assert list(functions_reward(["correct_answer", "correct_answer"])(rows, texts, [[1]] * 4)) == \
        ["correct_answer", "correct_answer_2"]


def test_each_reward_function_is_logged_and_none_is_left_out_of_the_sum(tmp_path):
    run = prepare_run(tiny_cfg(tmp_path, "method=grpo", "reward=functions", "method.max_new_tokens=4",
                               f"reward.functions=[{REWARDS}:none_for_odd,{REWARDS}:letters]",
                               "reward.weights=[2.0,1.0]", "train.max_steps=1", "data.eval_fraction=0"))
    execute(run)
    line = metrics(tmp_path / "run")[0]
    assert line["rewards/none_for_odd/mean"] == 1.0 and line["rewards/none_for_odd/std"] == 0.0
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    letters = [sum(c.isascii() and c.isalpha() for c in s["completion"]) / max(len(s["completion"]), 1)
               for s in samples]
    # completion 0: 2 x 1.0 + its letters; completion 1: its letters alone (none_for_odd said None)
    assert samples[0]["reward"] == pytest.approx(2.0 + letters[0], abs=1e-6)
    assert samples[1]["reward"] == pytest.approx(letters[1], abs=1e-6)


def fake_ctx_of(run):
    from alignkit.methods.record import Online

    return Online(run.cfg, run.model, run.tokenizer, run.device, None, run.reward_fn, {}, step=3,
                  prompts=run.train_examples)


def fake_ctx(tmp_path, *overrides):
    run = prepare_run(tiny_cfg(tmp_path, "method=grpo", *LETTERS, *overrides))
    return fake_ctx_of(run), run


def test_dynamic_sampling_drops_tied_groups_and_draws_more_prompts(tmp_path, monkeypatch):
    ctx, run = fake_ctx(tmp_path, "method.dynamic_sampling=true", "method.max_resamples=12", "method.max_new_tokens=4",
                        "train.batch_size=3")

    def ties_on_even_answers(rows, texts, completion_ids=None):  # odd answers: every completion its own reward
        return torch.tensor([1.0 if r["answer"] % 2 == 0 else float(i) for i, r in enumerate(rows)])

    ctx.reward = ties_on_even_answers
    examples = [e for e in run.train_examples if e["row"]["answer"] % 2 == 0][:2] + \
        [e for e in run.train_examples if e["row"]["answer"] % 2][:1]
    drawn, generate = [], critic_free.generate
    monkeypatch.setattr(critic_free, "generate", lambda *a: drawn.append(generate(*a)) or drawn[-1])
    batch = critic_free.rollout(ctx, examples)
    m = batch["metrics"]
    # gen_tokens_per_s counts the tokens of every draw, the extra prompts' too
    tokens = sum(len(c["response"]) for d in drawn for c in d)
    assert len(drawn) == m["dynamic_sampling/draws"] + 1
    assert m["gen_tokens_per_s"] * m["time/generation"] == pytest.approx(tokens, rel=1e-6)
    assert m["dynamic_sampling/dropped_groups"] >= 2 and m["dynamic_sampling/draws"] >= 1
    assert m["dynamic_sampling/kept_groups"] == 3 and len(batch["completions"]) == 3 * 4
    assert all(c["row"]["answer"] % 2 for c in batch["completions"])  # every kept group has a gradient
    # the extra prompts are a function of (seed, step, process, draw): a resumed run draws the same ones
    assert [e["source"] for e in critic_free.extra_prompts(ctx, 5, 1)] == \
        [e["source"] for e in critic_free.extra_prompts(ctx, 5, 1)] != \
        [e["source"] for e in critic_free.extra_prompts(ctx, 5, 2)]
    ctx.reward = lambda rows, texts, completion_ids=None: torch.ones(len(rows))  # every group ties: bounded
    batch = critic_free.rollout(ctx, examples)
    assert batch["metrics"]["dynamic_sampling/draws"] == 12 and batch["metrics"]["dynamic_sampling/kept_groups"] == 3
    assert batch["completions"] == batch["first"]["completions"]  # nothing kept: the step's own groups


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_give_the_numbers_of_one_batch(tmp_path, monkeypatch, loss_type):
    monkeypatch.setattr(critic_free, "generate", fixed_completions)
    results = []
    for i, size in enumerate(["null", "2"]):
        run = prepare_run(tiny_cfg(tmp_path / str(i), "method=grpo", "reward=functions",
                                   f"reward.functions=[{REWARDS}:text_length]", f"method.loss_type={loss_type}",
                                   "method.num_generations=2", f"method.micro_batch_size={size}", "train.batch_size=4",
                                   "train.max_steps=1", "data.eval_fraction=0", "method.mask_truncated_completions=true",
                                   "method.beta=0.1"))
        results.append(execute(run))
    one, chunked = results
    assert one["grad_norm"] > 1e-4 and one["reward"] > 1  # completions of different lengths: a gradient
    # the same loss and the same gradient (its norm; the weights after Adam's first step, ~lr * sign(g), would
    # show rounding on near-zero gradient entries rather than the sums)
    for key in ("loss", "grad_norm", "kl", "entropy", "reward", "completions/mean_length"):
        assert chunked[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


def test_num_iterations_reuses_one_generation_with_its_old_log_probs(tmp_path, monkeypatch):
    calls, seen = [], []
    real_generate = critic_free.generate
    monkeypatch.setattr(critic_free, "generate", lambda ctx, ex: calls.append(1) or real_generate(ctx, ex))
    from alignkit.methods import METHODS

    real_step = METHODS["grpo"].step

    def recording(model, mb, counts, method):
        loss, stats = real_step(model, mb, counts, method)
        logp = completions_logps(model, mb, method.temperature)[0]
        seen.append(float(((logp.detach() - mb["old_logp"]).abs() * mb["mask"]).max()))
        return loss, stats

    patch_method(monkeypatch, "grpo", step=recording)
    run = prepare_run(tiny_cfg(tmp_path, "method=grpo", *LETTERS, "method.num_iterations=3", "train.max_steps=2",
                               "method.max_new_tokens=6", "data.eval_fraction=0", "train.lr=0.05"))
    summary = execute(run)
    assert len(calls) == 2 and len(seen) == 6  # one generation per step, three optimizer steps on it
    assert seen[0] < 1e-5 and seen[3] < 1e-5   # the first pass: the policy that sampled, ratio 1
    assert seen[1] > 1e-4 and seen[2] > seen[1] * 0.5  # later passes: the stored old log-probs, ratio != 1
    assert summary["train_steps"] == 2


def test_the_documented_example_reward_functions_by_hand():
    example = Path(__file__).parent.parent / "examples" / "reward_functions.py"
    reward = functions_reward([f"{example}:reasoning_then_answer", f"{example}:close_answer", f"{example}:brevity"])
    rows = [{"prompt": [{"role": "user", "content": "q"}], "answer": 12}] * 3 + [{"prompt": "q"}]
    texts = ["7 + 5 = 12.\nAnswer: 12", "Answer: 10", "no idea", "3 = 3\nAnswer: 3"]
    out = reward(rows, texts, completion_ids=[[1] * 16, [1] * 64, [1] * 80, [1]])
    assert out["reasoning_then_answer"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out["close_answer"][:3].tolist() == pytest.approx([1.0, 1 / 3, 0.0]) and math.isnan(out["close_answer"][3])
    assert out["brevity"].tolist() == pytest.approx([0.75, 0.0, 0.0, 63 / 64])


@pytest.mark.parametrize("masked", [False, True])
def test_truncated_completions_are_marked_and_masked_out_of_the_loss_when_asked(tmp_path, masked):
    ctx, run = fake_ctx(tmp_path, "method.num_generations=3", f"method.mask_truncated_completions={masked}")
    completions = fixed_completions(ctx, run.train_examples[:2])  # the first of each group has no EOS
    mb = critic_free.micro_batch(ctx, completions)
    lengths = torch.tensor([len(c["response"]) for c in completions])
    assert mb["resp_mask"].sum(1).tolist() == lengths.tolist()
    expected = lengths * torch.tensor([0 if masked and c["truncated"] else 1 for c in completions])
    assert [c["truncated"] for c in completions] == [True, False, False] * 2
    assert mb["mask"].sum(1).tolist() == expected.tolist()
    # sampled ones: truncated = no EOS within max_new_tokens
    ctx.cfg.method.max_new_tokens = 3
    for c in critic_free.generate(ctx, run.train_examples[:2]):
        assert c["truncated"] == (ctx.tokenizer.eos_token_id not in c["response"]) and len(c["response"]) <= 3
