"""The DPO reference: precomputed = live (adapters off) for every adapter; eval's reference and its cache."""
import pytest
import torch

from alignkit.eval.run import run_eval
from alignkit.models.load import load_base_model
from alignkit.forward.logps import sequence_logps
from alignkit.forward.reference import precompute_reference, reference_sequence_logps as live_reference_logps
from alignkit.train import execute, prepare_run

from conftest import tiny_cfg


def move_trainable(model, scale: float = 0.05) -> None:
    """Take the adapter (or the weights) off their starting point, so policy != reference."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("adapter", ["lora", "qlora", "prompt", "prefix", "full", "bitdelta"])
def test_precomputed_reference_is_the_live_reference(tmp_path, adapter):
    """The cache pass runs the same forward as the live reference: the base with adapters off (for full and
    bitdelta, the model before training = the base checkpoint)."""
    run = prepare_run(tiny_cfg(tmp_path, "method=dpo", f"adapter={adapter}", "method.precompute_ref=true",
                               "adapter.num_virtual_tokens=3" if adapter in ("prompt", "prefix") else "train.seed=42"))
    examples = run.train_examples[:4]
    run.model.train()  # dropout is off; the 4-bit CPU kernel is the training one in train mode
    precompute_reference(run.model, examples, run.collate, 2, run.device, "fp32", tmp_path / "ref.safetensors")
    cached = torch.tensor([e["ref_chosen"] for e in examples] + [e["ref_rejected"] for e in examples])
    plain = {k: v for k, v in run.collate(examples).items() if k not in ("ref_chosen", "ref_rejected")}
    if adapter in ("full", "bitdelta"):
        base, _, _ = load_base_model(run.cfg.model, run.device, full_weights=True)
        with torch.no_grad():
            live = sequence_logps(base, plain)[0]
    else:
        move_trainable(run.model)  # the live reference must not depend on the adapter's weights
        live = live_reference_logps(run.model, plain)
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-4)


def test_a_cached_reference_is_not_reused_for_other_weights(tmp_path):
    run = prepare_run(tiny_cfg(tmp_path, "method=dpo", "adapter=full"))
    examples = run.train_examples[:2]
    cache = tmp_path / "ref.safetensors"
    precompute_reference(run.model, examples, run.collate, 2, run.device, "fp32", cache)
    first = [e.pop("ref_chosen") for e in examples]
    move_trainable(run.model, 0.5)  # other weights, same tokens, same file
    precompute_reference(run.model, examples, run.collate, 2, run.device, "fp32", cache)
    assert [e["ref_chosen"] for e in examples] != pytest.approx(first)


def test_eval_of_a_full_run_from_policy_init_uses_that_policy_as_reference(tmp_path):
    """A full fine-tune that started from an SFT policy is evaluated against that policy, not the raw base:
    with lr = 0 the run's policy is the SFT policy itself, so every reward is 0."""
    sft = prepare_run(tiny_cfg(tmp_path / "sft", "method=sft", "train.max_steps=3", "train.lr=5e-2"))
    execute(sft)
    dpo = prepare_run(tiny_cfg(tmp_path / "dpo", "method=dpo", "adapter=full", f"policy.init={sft.run_dir}",
                               "train.lr=0", "train.max_steps=1", "data.eval_fraction=0.25"))
    execute(dpo)
    result = run_eval([f"run={dpo.run_dir}", "sample.num_prompts=1", "sample.max_new_tokens=2"])
    assert result["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert result["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert not (tmp_path / "eval_ref_logps.safetensors").exists()


def test_eval_of_plain_models_keeps_each_models_reference(tmp_path, monkeypatch):
    """Two models evaluated from the same directory on the same data: the second never reads the first's
    reference, and nothing is written into the working directory."""
    full = prepare_run(tiny_cfg(tmp_path / "a", "method=sft", "adapter=full", "train.max_steps=2", "train.lr=5e-2"))
    execute(full)
    monkeypatch.chdir(tmp_path)
    common = ["model=tiny", "data.task_size=24", "data.max_length=160", "sample.num_prompts=1",
              "sample.max_new_tokens=2", "method=dpo", "adapter=full"]
    for path in ("alignkit:tiny", str(full.run_dir / "final")):
        result = run_eval([*common, f"model.path={path}"])
        # a plain model is its own reference: its rewards are 0 whichever model was evaluated before
        assert result["rewards/margins"] == pytest.approx(0.0, abs=1e-4), path
    assert not list(tmp_path.glob("*.safetensors"))
