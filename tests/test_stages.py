"""Tiny-model stage runs: every trainable parameter moves, frozen ones don't, final/ reloads."""
import json
from pathlib import Path

import pytest
import torch

from alignkit.data.collate import pad_batch
from alignkit.runs.read import load_run
from alignkit.forward.logps import forward_token_logps
from alignkit.forward.scores import last_token_scores
from alignkit.train import execute, prepare_run

from conftest import tiny_cfg

from alignkit.adapters import ADAPTERS
from alignkit.methods import METHODS

# every valid method x adapter cell of the table runs (a new adapter or method is tested by registering it;
# method presets share their method's code and are checked by test_configs), every adapter preset wherever its
# adapter runs, plus the adapter options that change which parameters train, how they start or how they are saved
BASE_METHODS = {m: record for m, record in METHODS.items() if record.preset_of is None}
LORA_OPTIONS = [("adapter.use_rslora=true",), ("adapter.init=gaussian",), ("adapter.init=olora",),
                ("adapter.init=pissa_niter_2",), ("train.loraplus_lr_ratio=16",)]
QLORA_OPTIONS = [("adapter.use_dora=true",), ("adapter.init=loftq",), ("adapter.init=loftq", "adapter.use_dora=true"),
                 ("adapter.use_rslora=true", "train.loraplus_lr_ratio=16")]
CELLS = [(m, a, ()) for m, record in BASE_METHODS.items() for a in record.adapters] + [
    (m, preset, ()) for m, record in BASE_METHODS.items() for a in record.adapters
    for preset in ADAPTERS[a].presets] + [
    ("dpo", "prefix", ("adapter.prefix_projection=true", "adapter.projection_hidden_size=16")),
    ("rm", "prefix", ("adapter.prefix_projection=true", "adapter.projection_hidden_size=16")),
    ("sft", "prompt", ("adapter.init_text=Answer:", "train.gradient_checkpointing=true")),
] + [(m, "lora", o) for m in ("sft", "dpo") for o in LORA_OPTIONS] + [
    (m, "qlora", o) for m in ("sft", "dpo") for o in QLORA_OPTIONS] + [
    ("sft", "lora", ("adapter.init=eva",)), ("dpo", "qlora", ("adapter.init=eva",)),  # EVA: ~6 s a cell
    ("rm", "lora", ("adapter.init=eva",)), ("ppo", "lora", ("adapter.init=eva",)),
    ("ppo", "qlora", ("adapter.init=loftq",)), ("rm", "qlora", ("adapter.init=loftq",)),
]
# what an online method needs to run on the tiny model: a reward that varies between completions (critic-free
# methods learn nothing from a group whose rewards agree), short rollouts
ONLINE = ("reward=functions", f"reward.functions=[{Path(__file__).parent / 'rewards.py'}:letters]",
          "method.max_new_tokens=8")


def snapshot(model):
    # 4-bit weights are frozen but are not Parameters with requires_grad: compare their raw data too
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def reload_batch(run):
    """A batch to compare the trained and the reloaded model on: the method's own, or (online) its prompts."""
    if run.method.online:
        return pad_batch([{"input_ids": e["prompt_ids"], "completion_mask": [1] * len(e["prompt_ids"])}
                          for e in run.train_examples[:2]], run.tokenizer.pad_token_id)
    return run.collate(run.train_examples[:2])


@pytest.mark.parametrize("method,adapter,options", CELLS, ids=lambda c: (" ".join(c) or "defaults") if isinstance(c, tuple) else c)
def test_stage_moves_every_trainable_parameter_and_reloads(tmp_path, method, adapter, options):
    # no eval split: bitsandbytes' CPU eval-mode kernel repacks 4-bit weights (lossy round trip on save),
    # which would make the trained model differ from a clean reload by ~1e-3
    record = METHODS[method]
    run = prepare_run(tiny_cfg(tmp_path, f"method={method}", f"adapter={adapter}", "data.eval_fraction=0",
                               *options, *(ONLINE if record.online else ())))
    before = snapshot(run.model)
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable
    summary = execute(run)
    after = snapshot(run.model)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"
    assert torch.isfinite(torch.tensor(summary["loss"]))

    run_dir = tmp_path / "run"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", *record.metrics} <= set(lines[0])
    if method == "dpo":  # all of TRL's DPO names, not only the headline ones
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"} <= set(lines[0])
    assert json.loads((run_dir / "summary.json").read_text())["train_steps"] == 2

    reloaded, _, _ = load_run(run_dir)
    if adapter == "bitdelta":
        return  # final/ is the lossy 1-bit artifact; its fidelity is checked in test_bitdelta.py
    if record.head == "lm+value":
        assert (run_dir / "final" / "value_head.safetensors").exists()
    batch = reload_batch(run)
    # train mode on both sides (dropout is off): bitsandbytes' CPU 4-bit kernel differs in eval mode
    run.model.train()
    reloaded.train()
    with torch.no_grad():
        if record.head == "score":
            expected, got = last_token_scores(run.model, batch), last_token_scores(reloaded, batch)
        else:
            expected = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    record_of = ADAPTERS[adapter] if adapter in ADAPTERS else ADAPTERS["lora"]  # dora, pissa: presets of lora
    if record_of.mergeable and not record_of.trains_base and not record_of.four_bit:
        plain = plain_peft_reload(run, run_dir, record.head)  # the LoRA family: no alignkit in the loop
        with torch.no_grad():
            if record.head == "score":
                got = last_token_scores(plain, batch)
            else:
                got = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def plain_peft_reload(run, run_dir, head):
    """final/ on a fresh base, as a user of transformers and peft would load it (full-precision base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = next(p.dtype for p in run.model.parameters() if p.is_floating_point())
    if head == "score":
        base = AutoModelForSequenceClassification.from_pretrained(run.model_dir, num_labels=1, dtype=dtype)
        base.config.pad_token_id = run.tokenizer.pad_token_id
    else:
        base = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, run_dir / "final").train()


def test_logps_match_a_plain_forward(tmp_path):
    run = prepare_run(tiny_cfg(tmp_path, "method=dpo"))
    batch = run.collate(run.train_examples[:3])
    run.model.eval()
    with torch.no_grad():
        lp, mask = forward_token_logps(run.model, batch)
        seq = (lp * mask).sum(-1)
        logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = torch.log_softmax(logits.double(), -1)
    for row in range(batch["input_ids"].shape[0]):
        total = 0.0
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["completion_mask"][row, t]:
                total += logprobs[row, t - 1, batch["input_ids"][row, t]].item()
        assert seq[row].item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_accumulation_equals_big_batch(tmp_path, method):
    """batch 2 x 2 accumulation == batch 4: same loss and same weights after the step."""
    results = []
    for i, (bs, ga) in enumerate([(4, 1), (2, 2)]):
        run = prepare_run(tiny_cfg(tmp_path / str(i), f"method={method}", f"train.batch_size={bs}",
                                   f"train.grad_accum={ga}", "train.max_steps=1", "data.eval_fraction=0"))
        summary = execute(run)
        results.append((summary["loss"], summary["grad_norm"], {n: p.detach().clone() for n, p in run.model.named_parameters()
                                          if p.requires_grad}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-4)  # same accumulated gradient
    for name, value in results[0][2].items():
        # Adam's first step is ~lr * sign(g): float noise on near-zero grads moves single entries,
        # so compare at a tolerance well below the update size (lr = 1e-2)
        torch.testing.assert_close(results[1][2][name], value, rtol=1e-3, atol=1e-4)


def test_dpo_reference_is_the_base_with_adapter_disabled(tmp_path):
    """At step 0 policy == reference, so the loss is log 2 and rewards are 0 (accuracy 0: strict >)."""
    run = prepare_run(tiny_cfg(tmp_path, "method=dpo"))
    batch = run.collate(run.train_examples[:2])
    loss, stats = run.step_fn(run.model, batch, batch["count"])
    assert loss.item() == pytest.approx(0.693147, abs=1e-5)
    assert stats["rewards/accuracies"].item() == 0.0
    assert stats["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)


def test_paged_optimizer_falls_back_off_gpu():
    import bitsandbytes as bnb

    from alignkit.session.optim import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.warns(UserWarning, match="paged optimizers need CUDA"):
        opt = make_optimizer("paged_adamw_8bit", params, 1e-3, 0.0, torch.device("cpu"))
    assert isinstance(opt, bnb.optim.AdamW8bit) and not isinstance(opt, bnb.optim.PagedAdamW8bit)


def test_every_prompt_too_long_is_a_clear_error(tmp_path):
    from alignkit.errors import UsageError

    with pytest.raises(UsageError, match="every row was dropped"):
        prepare_run(tiny_cfg(tmp_path, "method=dpo", "data.max_length=20"))
