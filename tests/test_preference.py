"""Reward-model learning and the DPO family on the tiny model."""
import json
import random

import pytest
import torch

from alignkit.stages.runner import execute, prepare_run

from conftest import tiny_cfg


def marker_prefs(path, n=96, seed=0):
    """Easy preference: the chosen reply says 'yes', the rejected one 'no'."""
    rng = random.Random(seed)
    words = ["cat", "sun", "red", "map", "cup", "box", "pen", "hat"]
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(3)) + "?"
            f.write(json.dumps({"prompt": prompt, "chosen": " yes", "rejected": " no"}) + "\n")
    return path


def test_rm_accuracy_rises_above_chance(tmp_path):
    data = marker_prefs(tmp_path / "prefs.jsonl")
    run = prepare_run(tiny_cfg(tmp_path, "method=rm", f"data.path={data}", "train.max_steps=30",
                               "train.batch_size=8", "train.lr=5e-3", "data.eval_fraction=0.25"))
    summary = execute(run)
    assert summary["eval/accuracy"] >= 0.9
    assert summary["eval/margin"] > 0


@pytest.mark.parametrize("loss", ["sigmoid", "cdpo", "ipo", "hinge", "simpo"])
def test_every_dpo_loss_trains(tmp_path, loss, monkeypatch):
    extra = ["method.label_smoothing=0.1"] if loss == "cdpo" else []
    run = prepare_run(tiny_cfg(tmp_path, "method=dpo", f"method.loss={loss}", *extra))
    if loss == "simpo":
        def no_reference(*a, **k):
            raise AssertionError("SimPO must not run a reference")
        monkeypatch.setattr(run.model, "disable_adapter", no_reference)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    summary = execute(run)
    assert torch.isfinite(torch.tensor(summary["loss"]))
    unchanged = [n for n, p in run.model.named_parameters() if p.requires_grad and torch.equal(before[n], p)]
    assert unchanged == []
    assert not (tmp_path / "run" / "ref_logps.safetensors").exists()


def test_precomputed_reference_is_cached_and_no_reference_runs_in_training(tmp_path, monkeypatch):
    run = prepare_run(tiny_cfg(tmp_path, "method=dpo", "method.precompute_ref=true", "data.eval_fraction=0"))
    calls = []
    original = run.model.disable_adapter
    monkeypatch.setattr(run.model, "disable_adapter", lambda: calls.append(1) or original())
    live = prepare_run(tiny_cfg(tmp_path / "live", "method=dpo", "data.eval_fraction=0"))
    summary, live_summary = execute(run), execute(live)
    # the reference came from the cache pass before training (the same forward as the live reference: adapters
    # off), one call per eval batch of the 24 rows; none while training
    assert len(calls) == 24 // run.cfg.train.eval_batch_size
    assert (tmp_path / "run" / "ref_logps.safetensors").exists()
    # the adapter starts at B = 0, so the cached reference equals the live one: same numbers
    # (up to float noise: the cache pass pads its batches differently)
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert summary[key] == pytest.approx(live_summary[key], rel=1e-4, abs=1e-6)
