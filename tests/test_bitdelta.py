"""BitDelta: packing, the compressed linear, scale distillation, the artifact, train and compress end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from alignkit.bitdelta import apply, attach_deltas, binarize, block_linears, pack_signs, unpack_signs, use_delta
from alignkit.bitdelta.artifact import load_artifact, save_artifact
from alignkit.bitdelta.compress import base_fingerprint, make_student
from alignkit.bitdelta.distill import calibration_stream, distill_scales
from alignkit.bitdelta.fidelity import batches, fidelity
from alignkit.bitdelta.linear import BitDeltaLinear, sign_matmul
from alignkit.bitdelta.pack import initial_scale, reconstruct
from alignkit.errors import UsageError

from conftest import TINY, tiny_cfg

CMD = [sys.executable, "-m", "alignkit"]
CPU = torch.device("cpu")


def signs_of(delta):
    """The documented convention: +1 where Δ > 0, -1 where Δ <= 0 (Δ = 0 -> -1, as in the paper)."""
    return torch.where(delta > 0, 1.0, -1.0).to(delta.dtype)


# ---- pure functions -------------------------------------------------------------------------
def test_pack_by_hand():
    delta = torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0, 0.5, 0.0, 0.0, 4.0])
    # element 8j+i -> bit i of byte j: bits 1,0,0,1,0,1,0,0 = 1 + 8 + 32; then 1, zero-padded
    assert pack_signs(delta).tolist() == [41, 1]
    assert pack_signs(delta).dtype == torch.uint8


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (3, 5), (13, 11), (2, 3, 5), (64, 64), (1, 17)])
def test_pack_unpack_round_trips_exactly_for_odd_shapes(shape):
    torch.manual_seed(0)
    delta = torch.randn(shape)
    delta[delta.abs() < 0.3] = 0.0  # exact zeros take the -1 side
    packed = pack_signs(delta)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(delta.numel() / 8)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        unpacked = unpack_signs(packed, shape, dtype)
        assert unpacked.shape == shape and unpacked.dtype == dtype
        assert torch.equal(unpacked, signs_of(delta).to(dtype))
    with pytest.raises(ValueError):
        unpack_signs(packed, (delta.numel() + 8,))


def test_reconstruction_is_sign_times_mean_abs_delta():
    torch.manual_seed(1)
    delta = torch.randn(5, 7)
    delta[0, :3] = 0.0
    alpha = initial_scale(delta)
    assert alpha.item() == pytest.approx(delta.abs().mean().item())
    rebuilt = reconstruct(pack_signs(delta), delta.shape, alpha)
    assert torch.equal(rebuilt, alpha * signs_of(delta))
    assert torch.equal(rebuilt[0, :3], -alpha.expand(3))  # Δ = 0 -> -α
    # α = mean|Δ| minimises the squared error for these signs
    err = lambda a: ((delta - a * signs_of(delta)) ** 2).sum().item()  # noqa: E731
    assert err(alpha) < min(err(alpha * 1.01), err(alpha * 0.99))


def test_sign_matmul_gradients_reach_the_input_and_the_scale():
    """Bug #2 of the reference repo: no gradient to x through α·S. Compare with a dense formula."""
    torch.manual_seed(2)
    delta = torch.randn(6, 5, dtype=torch.float64)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    dense_x = x.detach().clone().requires_grad_(True)
    dense_alpha = alpha.detach().clone().requires_grad_(True)
    out = sign_matmul(x, pack_signs(delta), delta.shape, alpha)
    want = dense_x @ (dense_alpha * signs_of(delta)).T
    torch.testing.assert_close(out, want)
    weights = torch.randn_like(want)
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(x.grad, dense_x.grad)
    torch.testing.assert_close(alpha.grad, dense_alpha.grad)
    assert torch.autograd.gradcheck(lambda x, a: sign_matmul(x, pack_signs(delta), delta.shape, a),
                                    (x.detach()[:1].requires_grad_(True), alpha))


def test_bitdelta_linear_serves_several_deltas_over_one_base():
    torch.manual_seed(3)
    base = torch.nn.Linear(5, 3)
    layer = BitDeltaLinear(base)
    deltas = {"a": torch.randn(3, 5), "b": torch.randn(3, 5)}
    for name, d in deltas.items():
        layer.add_delta(name, pack_signs(d), initial_scale(d))
    x = torch.randn(2, 5)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # nothing active: the base
        for name, d in deltas.items():
            layer.active = name
            w = base.weight + initial_scale(d) * signs_of(d)
            torch.testing.assert_close(layer(x), x @ w.T + base.bias)


# ---- tiny models ----------------------------------------------------------------------------
def tiny_pair(scale=0.02, seed=0):
    """The tiny Llama and a 'fine-tune' of it: block linears moved by row-scaled noise, one norm changed."""
    from alignkit.models.tiny import build_tiny_model

    base = build_tiny_model(320, seed=seed).eval()
    finetuned = build_tiny_model(320, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in block_linears(finetuned):
            w = finetuned.get_submodule(name).weight
            rows = torch.rand(w.shape[0], 1, generator=g) * 2  # uneven magnitudes: α = mean|Δ| is not optimal
            w.add_(scale * rows * torch.randn(w.shape, generator=g))
        finetuned.model.norm.weight.add_(0.1)
    return base, finetuned


def random_batches(n, batch_size=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [{"input_ids": torch.randint(4, 260, (length - i % 5,), generator=g).tolist(),
             "completion_mask": [1] * (length - i % 5)} for i in range(n)]
    return seqs


def test_block_linears_are_found_by_structure_not_by_name():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    base, _ = tiny_pair()
    names = block_linears(base)
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                            num_attention_heads=4, intermediate_size=64))
    names = block_linears(neox)
    assert len(names) == 3 * 4 and all(n.startswith("gpt_neox.layers.") for n in names)
    assert "embed_out" not in names


def test_binarize_keeps_changed_extras_and_apply_rebuilds_the_model(tmp_path):
    base, finetuned = tiny_pair()
    delta = binarize(base, finetuned, block_linears(base))
    assert set(delta.extras) == {"model.norm.weight"}
    save_artifact(tmp_path, delta, {"base_model": "tiny", "base_sha256": base_fingerprint(base)})
    loaded, manifest = load_artifact(tmp_path)
    assert manifest["linears"]["model.layers.0.mlp.down_proj"] == [64, 128]
    assert loaded.signs["model.layers.0.mlp.down_proj"].dtype == torch.uint8
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply(base, tmp_path)
    ft = dict(finetuned.named_parameters())
    for name, p in model.named_parameters():
        module = name.removesuffix(".weight")
        if module in delta.signs:
            d = ft[name] - original[name]
            torch.testing.assert_close(p, original[name] + d.abs().mean() * signs_of(d))
        else:
            assert torch.equal(p, ft[name]), name
    with pytest.raises(UsageError, match="not the one the artifact was made from"):
        apply(model, tmp_path)  # already applied: no longer the base


def test_scale_distillation_reduces_the_loss():
    base, finetuned = tiny_pair(scale=0.05)
    delta = binarize(base, finetuned, block_linears(base))
    make_student(base, delta)
    assert {n for n, p in base.named_parameters() if p.requires_grad} == {
        f"{n}.scales.student" for n in delta.signs}
    calibration = random_batches(4)  # one batch, seen every step: its loss must go down
    before = fidelity(finetuned, base, batches(calibration, 4, pad_id=3), CPU, "fp32")
    losses = distill_scales(finetuned, base, calibration_stream(calibration, 4, 3, seed=0), steps=20, lr=0.05,
                            loss="kl", device=CPU, precision="fp32")
    after = fidelity(finetuned, base, batches(calibration, 4, pad_id=3), CPU, "fp32")
    assert len(losses) == 20 and losses[-1] < 0.9 * losses[0]
    assert after["kl"] < 0.9 * before["kl"]
    assert losses[0] == pytest.approx(before["kl"], rel=1e-5)  # the loss is the masked per-token KL
    frozen = {n: p for n, p in base.named_parameters() if not p.requires_grad}
    assert all(p.grad is None for p in frozen.values())


def test_serving_switches_between_fine_tunes(tmp_path):
    base, ft_a = tiny_pair(seed=0)
    _, ft_b = tiny_pair(scale=0.05, seed=0)
    with torch.no_grad():
        ft_b.model.embed_tokens.weight.mul_(1.1)
    for name, ft in (("a", ft_a), ("b", ft_b)):
        save_artifact(tmp_path / name, binarize(base, ft, block_linears(base)),
                      {"base_model": "tiny", "base_sha256": base_fingerprint(base)})
    ids = torch.randint(4, 260, (2, 12))
    with torch.no_grad():
        want_base = base(ids).logits
        want = {n: apply(tiny_pair(seed=0)[0], tmp_path / n)(ids).logits for n in ("a", "b")}
        attach_deltas(base, {"a": tmp_path / "a", "b": tmp_path / "b"})
        for name in ("a", "b", None, "b"):
            use_delta(base, name)
            torch.testing.assert_close(base(ids).logits, want_base if name is None else want[name])
    with pytest.raises(UsageError, match="no fine-tune named"):
        use_delta(base, "c")


# ---- stages and the CLI ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_train_bitdelta_trains_only_block_linears_and_writes_the_artifact(tmp_path, method):
    from alignkit.train import execute, prepare_run

    run = prepare_run(tiny_cfg(tmp_path, f"method={method}", "adapter=bitdelta", "adapter.distill_steps=3",
                               "adapter.gold_max_new_tokens=4"))
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.weight" for n in block_linears(run.model)}
    summary = execute(run)
    if method == "dpo":
        # the frozen base's log-probs were taken once before training, so step 1 starts at log 2
        assert (tmp_path / "run" / "ref_logps.safetensors").exists()
        first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    final = tmp_path / "run" / "final"
    assert sorted(p.name for p in final.iterdir() if not p.name.startswith(("tokenizer", "chat_template"))) == [
        "bitdelta.json", "bitdelta.safetensors"]
    report = json.loads((tmp_path / "run" / "compress.json").read_text())
    assert report["size"]["extras"] == [] and report["size"]["ratio"] >= 10
    assert summary["bitdelta/size_ratio"] == report["size"]["ratio"]
    # the artifact over a fresh base gives the trained model's block linears up to the 1-bit error
    from transformers import AutoModelForCausalLM

    model = apply(AutoModelForCausalLM.from_pretrained(run.model_dir), final)
    trained = dict(run.model.named_parameters())
    for name, p in model.named_parameters():
        if name not in trainable:
            assert torch.equal(p, trained[name]), name


def alignkit(*args):
    return subprocess.run([*CMD, *args], capture_output=True, text=True)


def test_full_finetune_compress_reload_reproduces_the_report(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.bitdelta.pipeline import split_data
    from alignkit.data.load import load_rows

    trained = alignkit("train", "method=sft", "adapter=full", *TINY, "train.max_steps=3",
                       f"run.dir={tmp_path / 'ft'}")
    assert trained.returncode == 0, trained.stderr
    done = alignkit("compress", "base=alignkit:tiny", f"finetuned={tmp_path / 'ft' / 'final'}", *TINY[1:],
                    "data.eval_fraction=0.25", "adapter.distill_steps=4", "adapter.gold_max_new_tokens=4",
                    f"run.dir={tmp_path / 'c'}")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "c" / "compress.json").read_text())
    assert "fidelity on held-out rows" in done.stdout
    assert {e["name"] for e in report["size"]["extras"]} >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert report["size"]["one_bit_ratio"] > 15
    fid = report["fidelity"]
    assert fid["distilled"]["kl"] < fid["base"]["kl"] and fid["finetuned"]["kl"] == 0.0

    cfg = OmegaConf.load(tmp_path / "c" / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "c" / "final")
    finetuned = AutoModelForCausalLM.from_pretrained(tmp_path / "ft" / "final")
    model = apply(AutoModelForCausalLM.from_pretrained(report["base_dir"]), tmp_path / "c" / "final")
    _, held, _ = split_data(cfg, tokenizer, load_rows(cfg.data, cfg.train.seed))
    again = fidelity(finetuned, model, batches(held, cfg.train.eval_batch_size, tokenizer.pad_token_id), CPU,
                     "fp32")
    assert again["tokens"] == fid["distilled"]["tokens"]
    assert again["kl"] == pytest.approx(fid["distilled"]["kl"], rel=1e-6)
    assert again["agreement"] == fid["distilled"]["agreement"]


@pytest.mark.parametrize("args,message", [
    (["finetuned=/tmp"], "compress needs base=PATH"),
    (["base=alignkit:tiny"], "compress needs finetuned=PATH"),
    (["base=alignkit:tiny", "finetuned=/nonexistent/ft"], "finetuned: no such file or directory"),
    (["base=/nonexistent/base", "finetuned=alignkit:tiny"], "base: no such file or directory"),
    (["base=alignkit:tiny", "finetuned=alignkit:tiny", "adapter=lora"], "adapter must be bitdelta"),
    (["base=alignkit:tiny", "finetuned=alignkit:tiny", "adapter.distill_steps=-1"], "out of range"),
])
def test_bad_compress_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    from alignkit.cli import main

    assert main(["compress", *args, f"run.dir={tmp_path / 'run'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_compress_rejects_models_whose_shapes_differ(tmp_path):
    from alignkit.models.tiny import build_tiny_model, build_tiny_tokenizer

    other = tmp_path / "other"
    build_tiny_model(384).save_pretrained(other)  # a bigger vocabulary
    build_tiny_tokenizer().save_pretrained(other)
    done = alignkit("compress", "base=alignkit:tiny", f"finetuned={other}", *TINY[1:], f"run.dir={tmp_path / 'run'}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "finetuned does not match base: lm_head.weight has shape [384, 64]" in lines[0]

def test_compress_rejects_a_model_against_itself(tmp_path, capsys):
    from alignkit.cli import main

    assert main(["compress", "base=alignkit:tiny", "finetuned=alignkit:tiny", *TINY[1:],
                 f"run.dir={tmp_path / 'run'}"]) == 2
    assert "same weights: there is no fine-tune to compress" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
