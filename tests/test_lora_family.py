"""The LoRA family: inits that move the base keep a right reference and save for the original base;
LoRA+ gives the B matrices their own rate; every adapter starts as the base it was attached to."""
import json
import math

import pytest
import torch

from alignkit.adapters.reference import REFERENCE, reference_mode
from alignkit.models.load import load_base_model
from alignkit.forward.logps import sequence_logps
from alignkit.forward.scores import last_token_scores
from alignkit.train import execute, prepare_run

from conftest import metrics, tiny_cfg


def plain_base(run, head="lm"):
    """A fresh copy of the run's base model, as from_pretrained gives it (full precision)."""
    model, _, _ = load_base_model(run.cfg.model, torch.device("cpu"), head)
    return model.eval()


@pytest.mark.parametrize("adapter,options", [("pissa", ()), ("lora", ("adapter.init=olora",)),
                                             ("qlora", ("adapter.init=loftq",))])
def test_an_adapter_that_starts_away_from_zero_keeps_the_starting_model_as_reference(tmp_path, adapter, options):
    run = prepare_run(tiny_cfg(tmp_path, "method=dpo", f"adapter={adapter}", *options))
    run.model.train()
    batch = run.collate(run.train_examples[:2])
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert REFERENCE in run.model.peft_config and not any(f".{REFERENCE}." in n for n in trainable)
    loss, stats = run.step_fn(run.model, batch, batch["count"])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert stats["rewards/margins"].item() == pytest.approx(0.0, abs=1e-5)
    assert {n for n, p in run.model.named_parameters() if p.requires_grad} == trainable  # flags restored
    with torch.no_grad():
        with reference_mode(run.model):
            ref = sequence_logps(run.model, batch)[0]
        with run.model.disable_adapter():
            off = sequence_logps(run.model, batch)[0]
    if adapter == "qlora":  # LoftQ: the reference is the 4-bit base plus its initial correction
        policy = sequence_logps(run.model, batch)[0].detach()
        torch.testing.assert_close(ref, policy, rtol=0, atol=1e-5)
        check_loftq(run)
        return
    original = sequence_logps(plain_base(run), batch)[0]
    torch.testing.assert_close(ref, original, rtol=0, atol=1e-4)  # the original base, not W - sBA
    assert (off - original).abs().max() > 1e-2  # the pitfall: adapters off is the residual, not the base


def check_loftq(run):
    """s·B·A is the best rank-r fit of W - dequant(Q(W)) in every 4-bit layer, and the corrected model's logits
    are closer to the full-precision model's than the 4-bit base's are."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit
    from safetensors.torch import load_file

    weights = load_file(f"{run.model_dir}/model.safetensors")
    layers = [(n, m) for n, m in run.model.named_modules() if isinstance(m, Linear4bit)]
    assert layers
    for name, m in layers:
        q = m.get_base_layer().weight
        residual = weights[name.removeprefix("base_model.model.") + ".weight"] - \
            bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
        fit = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        tail = torch.linalg.svdvals(residual)[m.r["default"]:]
        assert (residual - fit).norm().item() ** 2 == pytest.approx((tail ** 2).sum().item(), rel=1e-3)
    batch = run.collate(run.train_examples[:8])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        original = plain_base(run)(**inputs).logits[real]
        corrected = run.model(**inputs).logits[real]
        with run.model.disable_adapter():
            four_bit = run.model(**inputs).logits[real]
    assert (corrected - original).abs().mean() < 0.8 * (four_bit - original).abs().mean()


def test_pissa_final_applies_to_the_original_base_with_plain_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = prepare_run(tiny_cfg(tmp_path, "method=sft", "adapter=pissa", "data.eval_fraction=0", "adapter.r=4"))
    execute(run)
    final = tmp_path / "run" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # [A | A0], [B | -B0]: rank 2r
    base = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, final).eval()
    batch = run.collate(run.train_examples[:3])
    run.model.eval()
    with torch.no_grad():
        expected = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_pissa_reward_model_keeps_its_score_head_through_the_conversion(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = prepare_run(tiny_cfg(tmp_path, "method=rm", "adapter=pissa", "data.eval_fraction=0"))
    execute(run)
    base = AutoModelForSequenceClassification.from_pretrained(run.model_dir, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = run.tokenizer.pad_token_id
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run" / "final").eval()
    batch = run.collate(run.train_examples[:3])
    run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(last_token_scores(reloaded, batch), last_token_scores(run.model, batch),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", [("adapter=pissa",), ("adapter=lora", "train.loraplus_lr_ratio=8")])
def test_resume_reproduces_the_run(tmp_path, options):
    """The PiSSA residual and reference are rebuilt by the same init; LoRA+'s param groups restore."""
    args = ("method=dpo", *options, "train.max_steps=4", "train.save_every=2", "data.eval_fraction=0")
    execute(prepare_run(tiny_cfg(tmp_path / "a", *args)))
    first = tmp_path / "a" / "run"
    execute(prepare_run(tiny_cfg(tmp_path / "b", *args, f"run.resume={first / 'checkpoints' / 'step-2'}")))
    whole, resumed = metrics(first), metrics(tmp_path / "b" / "run")
    assert [x["step"] for x in resumed] == [3, 4]
    for a, b in zip(whole[2:], resumed):
        for key in ("loss", "grad_norm", "rewards/margins", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


def test_loraplus_gives_the_b_matrices_lr_times_the_ratio(tmp_path):
    lr, ratio = 1e-3, 16.0
    steps = {}
    for name, extra in (("plain", []), ("plus", [f"train.loraplus_lr_ratio={ratio}"])):
        run = prepare_run(tiny_cfg(tmp_path / name, "method=sft", f"train.lr={lr}", "train.max_steps=1",
                                   "train.max_grad_norm=0", "train.schedule=constant", "data.eval_fraction=0", *extra))
        before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
        execute(run)
        steps[name] = {n: (p.detach() - before[n]).abs().max().item()
                       for n, p in run.model.named_parameters() if p.requires_grad}
    b_names = [n for n in steps["plus"] if "lora_B" in n]
    a_names = [n for n in steps["plus"] if "lora_A" in n]
    assert b_names and a_names
    # Adam's first step moves each weight by lr * g/|g| (B = 0 at init: A gets no gradient yet)
    for n in b_names:
        assert steps["plain"][n] == pytest.approx(lr, rel=1e-3)
        assert steps["plus"][n] == pytest.approx(lr * ratio, rel=1e-3)
    assert all(steps["plus"][n] == 0.0 for n in a_names)


def test_loraplus_param_groups(tmp_path):
    from alignkit.session.optim import make_optimizer

    run = prepare_run(tiny_cfg(tmp_path, "method=sft", "adapter=dora"))
    params = [p for p in run.model.parameters() if p.requires_grad]
    opt = make_optimizer("adamw", params, 1e-4, 0.0, torch.device("cpu"), run.model, 4.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == len(params)
    for name, p in run.model.named_parameters():
        if p.requires_grad:  # B matrices and DoRA's 1-D magnitudes fast, A matrices at lr
            fast = "lora_B" in name or "lora_magnitude_vector" in name
            assert lr_of[id(p)] == pytest.approx(4e-4 if fast else 1e-4), name


@pytest.mark.parametrize("adapter,options", [
    ("lora", ()), ("dora", ()), ("lora", ("adapter.use_rslora=true",)), ("lora", ("adapter.init=gaussian",)),
    ("lora", ("adapter.init=eva",)), ("vera", ()), ("loha", ()), ("lokr", ()), ("ia3", ()),
    ("qlora", ("adapter.use_dora=true",)),
])
def test_an_adapter_that_starts_at_zero_starts_as_its_base_with_adapters_off_as_reference(tmp_path, adapter, options):
    run = prepare_run(tiny_cfg(tmp_path, "method=sft", f"adapter={adapter}", *options))
    assert REFERENCE not in run.model.peft_config
    batch = run.collate(run.train_examples[:3])
    run.model.train()  # bitsandbytes' CPU 4-bit kernel differs in eval mode
    with torch.no_grad():
        on = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with reference_mode(run.model):
            off = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(on, off, rtol=0, atol=1e-6)
    if adapter != "qlora":
        base = plain_base(run)
        with torch.no_grad():
            plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(on, plain, rtol=0, atol=1e-5)


def test_eva_takes_its_a_matrices_from_the_training_activations(tmp_path):
    eva = prepare_run(tiny_cfg(tmp_path / "eva", "method=sft", "adapter.init=eva", "adapter.r=4"))
    plain = prepare_run(tiny_cfg(tmp_path / "plain", "method=sft", "adapter.r=4"))
    a = dict(eva.model.named_parameters())
    name = next(n for n in a if "q_proj.lora_A" in n and "layers.0" in n)
    rows = a[name].detach()
    assert not torch.equal(rows, dict(plain.model.named_parameters())[name])
    # EVA's A rows are right singular vectors of the layer inputs: orthonormal
    torch.testing.assert_close(rows @ rows.T, torch.eye(rows.shape[0]), rtol=0, atol=1e-4)


def test_ppo_with_pissa_scores_with_the_reward_model_as_its_own_model(tmp_path):
    """The RM's LoRA was trained on the original base; the PiSSA policy's base holds W - sBA."""
    from alignkit.runs.reward import make_reward

    execute(prepare_run(tiny_cfg(tmp_path / "rm", "method=rm", "train.max_steps=1")))
    run = prepare_run(tiny_cfg(tmp_path / "ppo", "method=ppo", "adapter=pissa", f"reward.run={tmp_path / 'rm' / 'run'}",
                               "method.max_new_tokens=4"))
    make_reward(run.cfg, run.model, run.tokenizer, run.model_dir)
    assert "reward" not in run.model.peft_config


@pytest.mark.parametrize("options,dora,rslora", [((), False, False), (("adapter.use_rslora=true",), False, True),
                                                 (("adapter.use_dora=true",), True, False),
                                                 (("adapter.use_dora=true", "adapter.use_rslora=true"), True, True)])
def test_a_lora_layer_computes_lora_rslora_and_dora_by_hand(tmp_path, options, dora, rslora):
    """One q_proj of the attached model against the formulas written out: s = alpha/r (rsLoRA: alpha/sqrt(r));
    LoRA: W x + s B A x; DoRA: m / ||W + sBA||_row * (W + sBA) x, m starting at ||W||_row."""
    r, alpha = 4, 8.0
    run = prepare_run(tiny_cfg(tmp_path, "method=sft", "adapter.r=4", "adapter.alpha=8", *options))
    layer = dict(run.model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    s = alpha / math.sqrt(r) if rslora else alpha / r
    assert layer.scaling["default"] == pytest.approx(s)
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B = 0 at init: give the adapter a value to check
        w = layer.get_base_layer().weight.float()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        x = torch.randn(3, w.shape[1])
        merged = w + s * b @ a
        if dora:
            m = layer.lora_magnitude_vector["default"].weight
            torch.testing.assert_close(m, w.norm(dim=1), rtol=0, atol=1e-5)
            expected = x @ (m[:, None] * merged / merged.norm(dim=1, keepdim=True)).T
        else:
            assert "default" not in layer.lora_magnitude_vector
            expected = x @ merged.T
        layer.eval()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
