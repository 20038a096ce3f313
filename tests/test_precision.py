"""fp16 trains through a gradient scaler: small gradients survive, overflow steps are the scaler's skips."""
import json

import pytest
import torch

from alignkit.session.faults import count_step, new_counts
from alignkit.session.optim import clipped_step, make_scaler
from alignkit.train import execute, prepare_run

from conftest import patch_method, tiny_cfg


def scale_sft_loss(monkeypatch, scale: float) -> None:
    """The SFT loss multiplied by `scale` (tiny losses: tiny fp16 gradients)."""
    from alignkit.methods import METHODS

    real = METHODS["sft"].step
    patch_method(monkeypatch, "sft", step=lambda model, batch, d, method=None: (real(model, batch, d)[0] * scale, {}))


def tiny_sft(tmp_path, precision: str, *overrides):
    run = prepare_run(tiny_cfg(tmp_path / precision, "method=sft", f"train.precision={precision}",
                               "train.max_steps=2", "data.eval_fraction=0", "train.max_grad_norm=0", *overrides))
    return execute(run), run


def test_fp16_gradients_that_would_underflow_survive_the_scaler(tmp_path, monkeypatch):
    """With the loss scaled down 1e-4 the fp16 gradients are below fp16's smallest number; the scaler lifts
    them, so the step-1 gradient norm is 1e-4 times the fp32 one (up to fp16 rounding)."""
    scale_sft_loss(monkeypatch, 1e-6)
    fp32, _ = tiny_sft(tmp_path, "fp32")
    fp16, _ = tiny_sft(tmp_path, "fp16", "train.save_every=1")
    first16 = json.loads((tmp_path / "fp16" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    first32 = json.loads((tmp_path / "fp32" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first32["grad_norm"] > 0
    assert first16["grad_norm"] == pytest.approx(first32["grad_norm"], rel=5e-2)
    assert fp16["skipped_steps"] == 0
    state = json.loads((tmp_path / "fp16" / "run" / "checkpoints" / "step-1" / "state.json").read_text())
    assert state["scaler"]["scale"] > 1.0  # the scaler's state is checkpointed (exact resume)


def test_without_the_scaler_those_fp16_gradients_are_lost(tmp_path, monkeypatch):
    """Why the scaler: the same run with it switched off loses most of the gradient to fp16 underflow."""
    import alignkit.session.session as session

    scale_sft_loss(monkeypatch, 1e-6)
    tiny_sft(tmp_path, "fp32")
    monkeypatch.setattr(session, "make_scaler", lambda precision, device: None)
    tiny_sft(tmp_path, "fp16")
    first16 = json.loads((tmp_path / "fp16" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    first32 = json.loads((tmp_path / "fp32" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first16["grad_norm"] < 0.5 * first32["grad_norm"], (first16["grad_norm"], first32["grad_norm"])


def test_an_inf_gradient_under_fp16_is_the_scalers_skip():
    """Finite loss, inf gradient: no update, the scale halves, the step is counted but is no bad streak."""
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = make_scaler("fp16", torch.device("cpu"))
    scale = scaler.get_scale()
    scaler.scale((param * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
    grad_norm, ok, overflow = clipped_step(opt, sched, [param], 1.0, loss=1.0, scaler=scaler)
    assert not ok and overflow and param.tolist() == [1.0, 1.0, 1.0]
    assert scaler.get_scale() == scale / 2
    counts = new_counts()
    count_step(counts, ok, 1, limit=1, run_dir=None, overflow=overflow)  # limit 1 would raise on a bad step
    assert counts == {"skipped_steps": 1, "bad_streak": 0}
    # a finite step after it updates with the unscaled gradient: lr * 1 per entry
    scaler.scale(param.sum()).backward()
    _, ok, _ = clipped_step(opt, sched, [param], 0.0, loss=1.0, scaler=scaler)
    assert ok and param.tolist() == pytest.approx([0.9, 0.9, 0.9])


def test_no_scaler_outside_fp16():
    assert make_scaler("fp32", torch.device("cpu")) is None and make_scaler("bf16", torch.device("cpu")) is None
