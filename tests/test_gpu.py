"""CUDA paths: placement, bf16 autocast, QLoRA NF4 on the GPU, paged 8-bit AdamW, fp16 with the scaler,
FSDP in one process. Skipped without a GPU; scripts/gpu_check.sh runs them on a GPU machine."""
import json
import subprocess
import sys

import pytest
import torch

from alignkit.train import execute, prepare_run

from conftest import TINY, metrics, tiny_cfg

pytestmark = pytest.mark.gpu


def cuda_params(model) -> set:
    return {p.device.type for p in model.parameters()}


def test_model_adapter_and_batches_live_on_the_gpu(tmp_path):
    run = prepare_run(tiny_cfg(tmp_path, "method=dpo", "train.precision=fp32"))
    assert run.device.type == "cuda" and cuda_params(run.model) == {"cuda"}
    summary = execute(run)
    assert summary["device"] == "cuda" and summary["peak_cuda_mb"] > 0


def test_auto_precision_is_bf16_autocast_and_close_to_fp32(tmp_path):
    """train.precision=auto on a bf16 GPU autocasts to bf16: step-1 DPO numbers agree with fp32 to bf16 rounding."""
    assert torch.cuda.is_bf16_supported()
    runs = {p: execute(prepare_run(tiny_cfg(tmp_path / p, "method=dpo", f"train.precision={p}", "model.dtype=float32",
                                            "train.max_steps=1", "data.eval_fraction=0")))
            for p in ("auto", "fp32")}
    auto, fp32 = (metrics(tmp_path / p / "run")[0] for p in ("auto", "fp32"))
    assert auto["logps/chosen"] != fp32["logps/chosen"]  # autocast did run in bf16
    assert auto["logps/chosen"] == pytest.approx(fp32["logps/chosen"], rel=2e-2)
    assert runs["auto"]["device"] == "cuda"


def test_qlora_nf4_on_the_gpu_trains_and_reloads(tmp_path):
    import bitsandbytes as bnb

    from alignkit.runs.read import load_run

    run = prepare_run(tiny_cfg(tmp_path, "method=dpo", "adapter=qlora", "data.eval_fraction=0"))
    quantised = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(m.weight.quant_type == "nf4" and m.weight.device.type == "cuda" for m in quantised)
    assert all(m.compute_dtype == torch.bfloat16 for m in quantised)  # compute_dtype=auto on a bf16 GPU
    execute(run)
    reloaded, _, _ = load_run(tmp_path / "run")
    batch = {k: v.cuda() for k, v in run.collate(run.train_examples[:2]).items() if torch.is_tensor(v)}
    run.model.eval()
    with torch.no_grad():
        want = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_paged_adamw_8bit_steps_and_resumes(tmp_path):
    import bitsandbytes as bnb

    from alignkit.session import optim as common

    run = prepare_run(tiny_cfg(tmp_path, "method=sft", "train.optimizer=paged_adamw_8bit", "train.max_steps=4",
                               "train.save_every=2", "data.eval_fraction=0"))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    opt = common.make_optimizer("paged_adamw_8bit", [torch.nn.Parameter(torch.zeros(4, device="cuda"))], 1e-3,
                                0.0, run.device)
    assert isinstance(opt, bnb.optim.PagedAdamW8bit)  # on CUDA the paged version itself, no fallback
    execute(run)
    assert all(not torch.equal(p, before[n]) for n, p in run.model.named_parameters() if p.requires_grad)
    resumed = tiny_cfg(tmp_path / "again", "method=sft", "train.optimizer=paged_adamw_8bit", "train.max_steps=4",
                       "train.save_every=2", "data.eval_fraction=0", f"run.resume={tmp_path / 'run' / 'checkpoints' / 'step-2'}")
    execute(prepare_run(resumed))
    got, want = metrics(tmp_path / "again" / "run"), metrics(tmp_path / "run")
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want[2:]], rel=1e-4)


def test_fp16_uses_the_gradient_scaler_on_the_gpu(tmp_path):
    run = prepare_run(tiny_cfg(tmp_path, "method=sft", "train.precision=fp16", "train.save_every=1",
                               "train.max_steps=2", "data.eval_fraction=0"))
    summary = execute(run)
    assert summary["skipped_steps"] <= 1  # the scaler may skip its first overflow while finding its scale
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-1" / "state.json").read_text())
    assert state["scaler"]["scale"] > 1.0
    assert all(m["grad_norm"] > 0 for m in metrics(tmp_path / "run") if "grad_norm" in m)


def test_fsdp_in_one_process_trains(tmp_path):
    """torchrun with one process and train.strategy=fsdp: the model is sharded (one shard) and trains."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           "-m", "alignkit", "train", "method=sft", "adapter=full", *TINY, "train.strategy=fsdp",
                           f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == "fsdp" and summary["device"] == "cuda"
