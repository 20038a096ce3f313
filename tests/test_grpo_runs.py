"""GRPO and RLOO runs on the tiny model: bad inputs, learning a toy reward, the frozen reference of adapter=full,
the SFT -> GRPO recipe."""
import json
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.forward.policy import response_forward
from alignkit.train import execute, prepare_run

from conftest import TINY, metrics, tiny_cfg

REWARDS = Path(__file__).parent / "rewards.py"


def functions(*names):
    return ["reward=functions", f"reward.functions=[{','.join(names)}]"]


BAD = [
    (functions("no_such_package.rewards:score"), "cannot import no_such_package.rewards", False),
    (functions(f"{REWARDS}:missing"), "has no function 'missing'", False),
    (functions("/nonexistent/rewards.py:score"), "no such file", False),
    (functions("nonsense"), "'nonsense' is not a built-in reward function", False),
    (["reward=functions", "reward.functions=[]"], "reward=functions needs reward.functions", False),
    (functions("correct_answer", "answer_format") + ["reward.weights=[1.0]"], "reward.weights has 1 values for 2",
     False),
    (["reward=gold", "method.micro_batch_size=3"], "is not a multiple of method.num_generations=2", False),
    (["reward=gold", "method.num_generations=1"], "method.num_generations=1 is out of range", False),
    (["reward=gold", "method.ref_quant=nf4"], "method.ref_quant=nf4 quantises the frozen reference copy", False),
    (functions(f"{REWARDS}:wrong_length"), "returned 5 values for 4 completions", True),
    (functions(f"{REWARDS}:raises"), "raised KeyError: 'no such column'", True),
    (functions(f"{REWARDS}:nan"), "returned NaN for completion 0: return None", True),
]


@pytest.mark.parametrize("overrides,message,at_run_time", BAD, ids=[m for _, m, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, message, at_run_time):
    run_dir = tmp_path / "run"
    code = main(["train", *TINY, "method=grpo", "method.num_generations=2", "method.max_new_tokens=4",
                 *overrides, f"run.dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [x for x in err if x.startswith("alignkit: error: ")]
    assert code == 2 and len(errors) == 1 and err[-1] == errors[0] and message in errors[0], err
    assert not any("Traceback" in x for x in err)
    # a bad config or a function that cannot be loaded fails before anything is written; a function that
    # misbehaves when called fails at the first step, leaving no summary that looks finished
    assert run_dir.exists() == at_run_time and not (run_dir / "summary.json").exists()


@pytest.mark.parametrize("method,extra", [("grpo", ()), ("rloo", ("method.beta=0.02",)),
                                          ("grpo", ("method.loss_type=grpo", "method.scale_rewards=none",
                                                    "method.importance_sampling_level=sequence",
                                                    "method.num_iterations=2", "method.beta=0.02"))],
                         ids=["grpo", "rloo", "grpo-variants"])
def test_tiny_policy_learns_a_toy_reward(tmp_path, method, extra):
    """~30 steps: the share of letters in its completions rises (the random tiny model writes ~1 in 6)."""
    summary = execute(prepare_run(tiny_cfg(
        tmp_path, f"method={method}", *functions(f"{REWARDS}:letters"), "train.max_steps=30", "train.batch_size=4",
        "method.num_generations=4", "train.lr=1e-2", "method.max_new_tokens=10", "data.eval_fraction=0",
        # the random tiny model is near-uniform with tiny output weights: LoRA on lm_head too
        "adapter.target_modules=[lm_head,q_proj,v_proj]", *extra)))
    lines = metrics(tmp_path / "run")
    first, last = (sum(x["reward"] for x in part) / 5 for part in (lines[:5], lines[-5:]))
    assert last > first + 0.15, (first, last)
    assert summary["train_steps"] == 30 and summary["skipped_steps"] == 0
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "entropy", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "gen_tokens_per_s",
                "rewards/letters/mean", "rewards/letters/std", *(("kl",) if "beta" in " ".join(extra) else ())):
        assert key in lines[-1], key
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "reward", "advantage"} <= set(samples[0])


def test_full_fine_tuning_with_a_kl_term_keeps_a_frozen_copy_as_its_reference(tmp_path, capsys):
    run = prepare_run(tiny_cfg(tmp_path / "a", "method=grpo", "adapter=full", "method.beta=0.1", "train.max_steps=2",
                               *functions(f"{REWARDS}:letters"), "method.max_new_tokens=6", "data.eval_fraction=0"))
    base = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    execute(run)
    assert "method.beta=0.1 with adapter=full: the reference is a frozen second copy of the base" in \
        capsys.readouterr().err
    frozen = dict(run.reference.named_parameters())
    assert all(torch.equal(frozen[n], base[n]) and not frozen[n].requires_grad for n in base)
    assert any(not torch.equal(p, base[n]) for n, p in run.model.named_parameters())  # the policy moved, not it
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        got = response_forward(run.reference, ids, torch.ones_like(ids), 3, 1.0)[0]
        logits = run.reference(input_ids=ids).logits[:, 1:-1]
    torch.testing.assert_close(got, torch.log_softmax(logits, -1).gather(-1, ids[:, 2:, None]).squeeze(-1))
    # without a KL term no copy is loaded, and nothing says so
    run = prepare_run(tiny_cfg(tmp_path / "b", "method=grpo", "adapter=full", "train.max_steps=1",
                               *functions(f"{REWARDS}:letters"), "method.max_new_tokens=4", "data.eval_fraction=0"))
    execute(run)
    assert run.reference is None and "frozen" not in capsys.readouterr().err
    # a 4-bit copy
    run = prepare_run(tiny_cfg(tmp_path / "c", "method=rloo", "adapter=full", "method.ref_quant=nf4",
                               "train.max_steps=1", *functions(f"{REWARDS}:letters"), "method.max_new_tokens=4",
                               "data.eval_fraction=0"))
    execute(run)
    assert "(nf4 weights" in capsys.readouterr().err
    assert any(type(m).__name__ == "Linear4bit" for m in run.reference.modules())


def test_no_memory_for_a_second_copy_is_said_before_loading_it(tmp_path, capsys, monkeypatch):
    from alignkit.models import frozen

    monkeypatch.setattr(frozen, "free_bytes", lambda device: 1 << 10)  # 1 KiB free (the tiny base: ~0.6 MB)
    loads = []
    monkeypatch.setattr(frozen, "load_base_model", lambda *a, **k: loads.append(1))
    code = main(["train", *TINY, "method=grpo", "adapter=full", "method.beta=0.04", "reward=gold",
                 f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not loads, err
    assert "method.beta=0.04 with adapter=full needs a frozen second copy of the base" in err[-1]
    assert "but only 0.00 GiB is free" in err[-1] and "method.ref_quant=int8 or nf4" in err[-1]
    assert code == main(["train", *TINY, "method=ppo", "adapter=full", "reward=gold", f"run.dir={tmp_path / 'ppo'}"])
    assert "method.kl_coef=0.05 with adapter=full needs a frozen second copy" in capsys.readouterr().err


def test_grpo_recipe_runs_sft_then_grpo_and_reports_the_reward_curve(tmp_path):
    from alignkit.recipe.run import run_recipe

    root = tmp_path / "grpo"
    summaries = run_recipe("grpo", [*TINY, "data.max_length=320", "data.eval_fraction=0.2", "sample.num_prompts=4",
                                    "sample.max_new_tokens=8", "grpo.method.max_new_tokens=6",
                                    "grpo.train.batch_size=2", f"run.dir={root}"])
    assert list(summaries) == ["sft", "grpo"] and summaries["grpo"]["train_steps"] == 2
    report = (root / "report.md").read_text()
    assert "`grpo` (grpo): `reward`" in report and "| grpo | sft |" in report
    assert (root / "plots" / "grpo.png").exists() and (root / "plots" / "policies.png").exists()
    evaluated = json.loads((root / "grpo" / "eval.json").read_text())
    assert {"gold/score", "gold/score_ref", "kl_to_ref"} <= set(evaluated)
