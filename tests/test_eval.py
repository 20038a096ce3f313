"""`alignkit eval`, `alignkit generate` and the reward scorer on tiny runs."""
import json

import pytest
import torch

from alignkit.runs.reward import load_scorer
from alignkit.eval.run import run_eval, run_generate
from alignkit.forward.scores import last_token_scores
from alignkit.train import execute, prepare_run

from conftest import tiny_cfg
from conftest import alignkit
from test_preference import marker_prefs


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    data = marker_prefs(tmp / "prefs.jsonl")
    run = prepare_run(tiny_cfg(tmp, "method=rm", f"data.path={data}", "train.max_steps=30", "train.batch_size=8",
                               "train.lr=5e-3", "data.eval_fraction=0.25"))
    return run, execute(run)


def test_eval_of_an_rm_run_matches_its_training_eval(rm_run):
    run, summary = rm_run
    result = run_eval([f"run={run.run_dir}"])
    assert result["accuracy"] == pytest.approx(summary["eval/accuracy"])
    assert result["margin"] == pytest.approx(summary["eval/margin"], rel=1e-4)
    saved = json.loads((run.run_dir / "eval.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and saved["method"] == "rm"


def test_scorer_gives_the_trained_models_scores(rm_run):
    run, _ = rm_run
    score = load_scorer(run.run_dir)
    prompts, chosen, rejected = ["cat sun red?", "map cup box?"], [" yes", " yes"], [" no", " no"]
    got_c, got_r = score(prompts, chosen), score(prompts, rejected)
    assert (got_c > got_r).all()
    batch = run.collate(run.eval_examples[:1])
    e = run.eval_examples[0]["chosen"]["input_ids"]
    text = run.tokenizer.decode(e)
    run.model.train()
    with torch.no_grad():
        expected = last_token_scores(run.model, batch)[0]
    direct = score([""], [text.removesuffix(run.tokenizer.eos_token)])  # encode_pair re-appends EOS
    assert direct[0].item() == pytest.approx(expected.item(), abs=1e-4)


def test_eval_of_a_dpo_run_reports_dpo_and_gold_metrics(tmp_path):
    run = prepare_run(tiny_cfg(tmp_path, "method=dpo", "data.eval_fraction=0.25"))
    summary = execute(run)
    result = run_eval([f"run={run.run_dir}", "sample.max_new_tokens=8", "sample.num_prompts=3"])
    assert result["rewards/accuracies"] == pytest.approx(summary["eval/rewards/accuracies"])
    assert result["rewards/margins"] == pytest.approx(summary["eval/rewards/margins"], rel=1e-3, abs=1e-6)
    assert 0.0 <= result["gold/score"] <= 1.0 and "gold/score_ref" in result
    records = run_generate([f"run={run.run_dir}", "sample.prompts=[What is 2 + 3?]", "sample.max_new_tokens=5"])
    assert len(records) == 1 and isinstance(records[0]["completion"], str)


def test_eval_cli_and_bad_run_dir(rm_run, tmp_path):
    run, _ = rm_run
    done = alignkit("eval", f"run={run.run_dir}")
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout
    bad = alignkit("eval", f"run={tmp_path / 'nope'}")
    assert bad.returncode == 2 and "not a finished alignkit run" in bad.stderr
    typo = alignkit("eval", f"run={run.run_dir}", "sample.max_new_tokenz=3")
    assert typo.returncode == 2 and "unknown key" in typo.stderr
