"""Recipes: stage overrides, the shell scripts, both recipes end to end on the tiny model, SIGKILL + resume."""
import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.data.tasks import judge_sentiment, sentiment_rows, tone
from alignkit.errors import UsageError
from alignkit.recipe.plan import plan_recipe
from alignkit.recipe.run import run_recipe
from alignkit.session.logs import open_log, read_log

from conftest import TINY
from conftest import CMD

ROOT = Path(__file__).resolve().parents[1]
# tiny stages; eval on 4 held-out prompts, 8 new tokens
FAST = (*TINY, "data.eval_fraction=0.2", "sample.num_prompts=4", "sample.max_new_tokens=8", "train.save_every=1")


def test_sentiment_task_prefers_tone_and_its_judge_reads_it():
    rows = sentiment_rows(200, seed=3)
    assert rows == sentiment_rows(200, seed=3) and rows != sentiment_rows(200, seed=4)
    text = lambda row, key: row[key][0]["content"]  # noqa: E731
    assert all(judge_sentiment(text(r, "chosen"), r["answer"]) == 1.0 for r in rows)
    assert all(judge_sentiment(text(r, "rejected"), r["answer"]) == 0.0 for r in rows)
    # chosen and rejected differ only in their tone words
    assert all(len(text(r, "chosen").split()) == len(text(r, "rejected").split()) for r in rows)
    demos = sum(judge_sentiment(text(r, "completion"), "positive") for r in rows) / len(rows)
    assert 0.2 < demos < 0.45  # SFT demonstrations take any of three tones
    assert tone("The staff were not friendly, the food was tasty.") == "neutral"
    assert tone("It wasn't bad at all!") == "positive" and tone("Dull and noisy.") == "negative"


def test_overrides_address_a_stage_or_every_stage(tmp_path):
    root, stages = plan_recipe("rlhf", ["model=tiny", "sft.train.lr=0.003", "ppo.method.kl_coef=0.2",
                                        "train.seed=7", f"run.dir={tmp_path}"])
    sft, rm, ppo = (s.cfg for s in stages)
    assert [s.name for s in stages] == ["sft", "rm", "ppo"] and root == tmp_path
    assert (sft.train.lr, rm.train.lr, ppo.train.lr) == (0.003, 1e-4, 2e-4)  # the recipe sets ppo's
    assert ppo.method.kl_coef == 0.2 and {c.train.seed for c in (sft, rm, ppo)} == {7}
    assert {c.model.path for c in (sft, rm, ppo)} == {"alignkit:tiny"}
    assert rm.policy.init == ppo.policy.init == str(tmp_path / "sft") and ppo.reward.run == str(tmp_path / "rm")
    assert [c.run.dir for c in (sft, rm, ppo)] == [str(tmp_path / n) for n in ("sft", "rm", "ppo")]
    for bad, message in [("method.beta=0.2", "address one"), ("run.resume=true", "resumes by itself"),
                         ("sft.nope.x=1", "Could not override 'nope.x'"), ("foo=1", "not a stage key")]:
        with pytest.raises(Exception, match=message):
            plan_recipe("rlhf", [bad])
    with pytest.raises(UsageError, match="unknown recipe 'nope'"):
        plan_recipe("nope", [])
    # data.path wins over the recipe's built-in task, in the config a finished stage is compared with
    assert {s.cfg.data.task for s in plan_recipe("dpo", ["data.path=prefs.jsonl"])[1]} == {None}
    assert main(["recipe"]) == 2 and main(["recipe", "dpo", "-m"]) == 2


@pytest.mark.parametrize("name", ["dpo", "rlhf"])
def test_shell_script_runs_the_recipes_train_commands(tmp_path, name):
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "alignkit"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(ROOT / "scripts" / f"recipe_{name}.sh"), str(tmp_path / "r"), "model=tiny"],
                   check=True, env=env)
    calls = log.read_text().splitlines()
    _, stages = plan_recipe(name, ["model=tiny", f"run.dir={tmp_path / 'r'}"])
    assert [c for c in calls if c.startswith("train ")] == [" ".join(["train", *s.overrides]) for s in stages]
    assert calls[-1] == f"eval run={tmp_path / 'r' / stages[-1].name}"


def test_metrics_log_drops_what_an_interrupted_run_wrote_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with open_log(path, resumed_at=2) as f:
        f.write(json.dumps({"step": 3, "loss": 30}) + "\n")
    assert [(r["step"], r["loss"]) for r in read_log(path)] == [(1, 1), (2, 2), (3, 30)]


def dpo_results(root: Path) -> dict:
    """The second stage's final metrics, every logged step (each once) and its evaluation, flat."""
    out = {f"summary/{k}": v for k, v in json.loads((root / "dpo" / "summary.json").read_text()).items()
           if k in ("step", "loss", "grad_norm", "rewards/margins", "logps/chosen", "eval/loss", "eval/rewards/margins")}
    for i, record in enumerate(read_log(root / "dpo" / "metrics.jsonl")):
        out.update({f"line{i}/{k}": v for k, v in record.items() if not k.endswith("_per_s")})
    evaluated = json.loads((root / "dpo" / "eval.json").read_text())
    out.update({f"eval/{k}": v for k, v in evaluated.items() if isinstance(v, float)})
    return out


def test_dpo_recipe_killed_in_its_second_stage_resumes_to_the_same_result(tmp_path, capsys):
    args = [*FAST, "dpo.train.max_steps=16", "dpo.train.keep_checkpoints=1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_recipe("dpo", [*args, f"run.dir={whole}"])
    assert (whole / "report.md").exists() and (whole / "plots" / "dpo.png").exists()
    assert (whole / "plots" / "policies.png").exists()
    summary = json.loads((whole / "dpo" / "summary.json").read_text())
    assert "/policy-sft-" in summary["base_model"]  # DPO trained on the merged SFT policy, its reference too

    proc = subprocess.Popen([*CMD, "recipe", "dpo", *args, f"run.dir={killed}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    while not ((killed / "sft" / "summary.json").exists() and list((killed / "dpo").glob("checkpoints/step-*/state.json"))):
        assert proc.poll() is None and time.time() < deadline, "the recipe ended before its second stage saved"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "dpo" / "summary.json").exists(), "killed too late: the second stage had finished"
    run_recipe("dpo", [*args, f"run.dir={killed}"])
    want, got = dpo_results(whole), dpo_results(killed)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7) and len(got) > 60
    report = (killed / "report.md").read_text()
    assert "| sft | sft | done |" in report and "| dpo | dpo | resume |" in report

    run_recipe("dpo", [*args, f"run.dir={killed}"])  # everything finished: both stages skipped
    assert "| dpo | dpo | done |" in (killed / "report.md").read_text()
    capsys.readouterr()
    assert main(["recipe", "dpo", *args, "sft.train.lr=0.5", f"run.dir={killed}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage sft finished" in err[0] and "train.lr: 0.01 -> 0.5" in err[0]


def test_rlhf_recipe_runs_end_to_end_with_tensorboard(tmp_path):
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # an optional extra
    root = tmp_path / "rlhf"
    summaries = run_recipe("rlhf", [*FAST, "ppo.method.max_new_tokens=8", f"run.tensorboard={tensorboard}",
                                    f"run.dir={root}"])
    assert list(summaries) == ["sft", "rm", "ppo"] and summaries["ppo"]["train_steps"] == 2
    assert "accuracy" in summaries["rm"] and "objective/kl" in summaries["ppo"]
    report = (root / "report.md").read_text()
    # each stage's first headline metric: the reward model's held-out accuracy, PPO's rollout scores early and late
    assert "`rm` (rm): held-out `accuracy`" in report and "| ppo | sft |" in report
    assert "`ppo` (ppo): `objective/scores`" in report and "over the first" in report
    for stage in ("sft", "rm", "ppo"):
        assert (root / "plots" / f"{stage}.png").exists()
        assert bool(list((root / stage / "tensorboard").glob("events.out.tfevents.*"))) == tensorboard
    assert "kl_to_ref" in json.loads((root / "ppo" / "eval.json").read_text())


def test_tensorboard_missing_is_one_clear_error(monkeypatch):
    import sys

    from alignkit.session.events import require_tensorboard

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UsageError, match="needs the tensorboard package"):
        require_tensorboard()
