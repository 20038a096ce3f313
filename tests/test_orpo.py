"""ORPO: the odds-ratio loss by hand, the step against lone forwards (NLL on the answer or on prompt + answer),
packing, accumulation, no reference, eval and the recipe."""
import json
import math

import pytest
import torch

from alignkit.eval.run import run_eval
from alignkit.objectives import log1mexp, odds_ratio_loss
from alignkit.recipe.run import run_recipe
from alignkit.train import execute, prepare_run

from conftest import metrics, tiny_cfg
from test_packing import plain_logp
from test_recipe import FAST


def test_odds_ratio_loss_on_two_pairs_by_hand():
    # pair 1: p_w = 1/2 (odds 1, log odds 0), p_l = 1/4 (odds 1/3): log odds ratio = log 3,
    #         log sigmoid(log 3) = log(3/4); pair 2: p_w = 1/5 (odds 1/4), p_l = 1/2: log sigmoid(log 1/4) = log(1/5)
    chosen, rejected = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.5]))
    losses, log_odds, ratio = odds_ratio_loss(chosen, rejected, beta=0.1)
    assert log_odds.tolist() == pytest.approx([math.log(3), math.log(0.25)], abs=1e-6)
    assert ratio.tolist() == pytest.approx([math.log(0.75), math.log(0.2)], abs=1e-6)
    assert losses.tolist() == pytest.approx([-0.1 * math.log(0.75), -0.1 * math.log(0.2)], abs=1e-6)  # 0.028768, 0.160944


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-10, -0.5, -0.7, -50.0], dtype=torch.float64)
    assert log1mexp(x).tolist() == pytest.approx([math.log(1e-10), math.log(1 - math.exp(-0.5)),
                                                  math.log(1 - math.exp(-0.7)), -math.exp(-50.0)], rel=1e-9)
    assert log1mexp(torch.tensor([-1e-6])).item() == pytest.approx(math.log(1e-6), rel=1e-5)  # float32 too


def original_mask(seq: dict, answer_tokens: int | None) -> list[int]:
    """The answer mask of a chosen sequence (nll_on_prompt counts all its tokens: its answer is the end)."""
    if answer_tokens is None:
        return seq["completion_mask"]
    return [0] * (len(seq["input_ids"]) - answer_tokens) + [1] * answer_tokens


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("on_prompt", [False, True])
def test_step_matches_lone_forwards(tmp_path, packed, on_prompt):
    """Average answer log-probs, the NLL (a mean over the chosen answers' tokens, or their prompts' too), the odds
    ratio and every logged number, from plain one-sequence forwards with the formulas written out."""
    run = prepare_run(tiny_cfg(tmp_path, "method=orpo", "method.beta=0.5", f"method.nll_on_prompt={on_prompt}",
                               f"train.packing={packed}"))
    examples = run.train_examples[:3]
    batch = run.collate(examples)
    assert ("packed" in batch) == packed
    loss, stats = run.step_fn(run.model, batch, 3)
    nll, nll_tokens, want = 0.0, 0, {k: 0.0 for k in stats}
    with torch.no_grad():
        for e in examples:
            answer = original_mask(e["chosen"], e.get("answer_tokens"))
            assert (sum(e["chosen"]["completion_mask"]) == len(answer)) == on_prompt
            avg_w = plain_logp(run.model, {**e["chosen"], "completion_mask": answer}) / sum(answer[1:])
            avg_l = plain_logp(run.model, e["rejected"]) / sum(e["rejected"]["completion_mask"][1:])
            counted = e["chosen"]["completion_mask"]  # what the NLL covers
            nll -= plain_logp(run.model, e["chosen"])
            nll_tokens += sum(counted[1:])
            log_odds = (avg_w - avg_l) - (math.log1p(-math.exp(avg_w)) - math.log1p(-math.exp(avg_l)))
            log_sig = -math.log1p(math.exp(-log_odds))
            for key, value in {"log_odds_chosen": log_odds, "log_odds_ratio": log_sig, "rewards/chosen": 0.5 * avg_w,
                               "rewards/rejected": 0.5 * avg_l, "rewards/margins": 0.5 * (avg_w - avg_l),
                               "rewards/accuracies": float(avg_w > avg_l), "logps/chosen": avg_w,
                               "logps/rejected": avg_l, "or_loss": -0.5 * log_sig}.items():
                want[key] = want.get(key, 0.0) + value / 3
    want["nll_loss"] = nll / nll_tokens
    assert loss.item() == pytest.approx(want.pop("or_loss") + want["nll_loss"], rel=1e-5)
    assert {k: float(v) / 3 for k, v in stats.items()} == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_prompts_shared_in_the_packed_layout_unless_the_nll_counts_them(tmp_path):
    """The answers start after one common prompt (so packing lays it out once); with nll_on_prompt every chosen
    token after the first is counted, and the chosen answer's own tokens are recorded."""
    paper = prepare_run(tiny_cfg(tmp_path / "a", "method=orpo")).train_examples[0]
    trl = prepare_run(tiny_cfg(tmp_path / "b", "method=orpo", "method.nll_on_prompt=true")).train_examples[0]
    prompt = paper["chosen"]["completion_mask"].index(1)
    assert prompt > 0 and paper["rejected"]["completion_mask"].index(1) == prompt
    assert paper["chosen"]["input_ids"][:prompt] == paper["rejected"]["input_ids"][:prompt]
    assert trl["chosen"]["completion_mask"] == [1] * len(trl["chosen"]["input_ids"])
    assert trl["answer_tokens"] == sum(paper["chosen"]["completion_mask"][1:])
    assert trl["rejected"] == paper["rejected"]


def test_accumulation_gives_the_big_batch_numbers(tmp_path):
    """batch 4 == 2 x 2 accumulated: the NLL is a mean over the step's chosen tokens, the odds ratio over its
    pairs, so every number of the step (and the gradient) is the big batch's."""
    results = []
    for i, (bs, ga) in enumerate([(4, 1), (2, 2)]):
        run = prepare_run(tiny_cfg(tmp_path / str(i), "method=orpo", f"train.batch_size={bs}",
                                   f"train.grad_accum={ga}", "train.max_steps=1", "data.eval_fraction=0"))
        execute(run)
        results.append({k: v for k, v in metrics(run.run_dir)[0].items() if not k.endswith("_per_s")})
    assert results[1] == pytest.approx(results[0], rel=1e-4, abs=1e-6)


def test_orpo_runs_no_reference_and_eval_reports_trls_names(tmp_path, monkeypatch):
    run = prepare_run(tiny_cfg(tmp_path, "method=orpo", "data.eval_fraction=0.25"))

    def no_reference(*a, **k):
        raise AssertionError("ORPO must not run a reference")

    monkeypatch.setattr(run.model, "disable_adapter", no_reference)
    summary = execute(run)
    assert {"eval/log_odds_ratio", "eval/nll_loss", "eval/rewards/accuracies"} <= set(summary)
    assert not (run.run_dir / "ref_logps.safetensors").exists()
    monkeypatch.undo()
    result = run_eval([f"run={run.run_dir}", "sample.num_prompts=2", "sample.max_new_tokens=4"])
    assert {"log_odds_ratio", "log_odds_chosen", "nll_loss", "rewards/chosen", "rewards/margins", "gold/score",
            "gold/score_ref"} <= set(result)
    assert result["nll_loss"] == pytest.approx(summary["eval/nll_loss"], rel=1e-5)


def test_orpo_recipe_is_one_stage_from_the_base(tmp_path):
    root = tmp_path / "orpo"
    summaries = run_recipe("orpo", [*FAST, f"run.dir={root}"])
    assert list(summaries) == ["orpo"] and "log_odds_ratio" in summaries["orpo"]
    report = (root / "report.md").read_text()
    assert "`orpo` (orpo): held-out `log_odds_ratio`" in report
    assert "| base | - |" in report and "| orpo | base |" in report  # the base's gold score next to ORPO's
    assert "nll_loss" in json.loads((root / "orpo" / "eval.json").read_text())
