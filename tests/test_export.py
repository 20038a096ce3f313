"""`alignkit export`: the merged model reloads with plain transformers and gives the run's outputs."""
import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from alignkit.methods import saved_config as load_saved_config
from alignkit.export.run import run_export
from alignkit.runs.read import load_run
from alignkit.forward.scores import last_token_scores
from alignkit.train import execute, prepare_run

from conftest import alignkit, compose, tiny_cfg

RUNS = {  # name -> train overrides (tiny model, 2 steps)
    "lora": ("method=sft",),
    "qlora": ("method=sft", "adapter=qlora"),
    "dora": ("method=dpo", "adapter=dora"),
    "pissa": ("method=sft", "adapter=pissa"),
    "vera": ("method=sft", "adapter=vera", "adapter.r=32"),
    "qdora": ("method=sft", "adapter=qlora", "adapter.use_dora=true"),  # DoRA on the 4-bit base
    "loftq": ("method=dpo", "adapter=qlora", "adapter.init=loftq"),
    "olora": ("method=sft", "adapter.init=olora"),
    "loha": ("method=sft", "adapter=loha"),
    "lokr": ("method=sft", "adapter=lokr"),
    "ia3": ("method=sft", "adapter=ia3"),
    "full": ("method=sft", "adapter=full", "train.lr=1e-3"),
    "bitdelta": ("method=sft", "adapter=bitdelta", "train.lr=1e-3", "adapter.distill_steps=2"),
    "rm": ("method=rm",),
    "ppo": ("method=ppo", "reward=gold", "method.max_new_tokens=6"),
}
FOUR_BIT = ("qlora", "qdora", "loftq")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished runs, made on first use."""
    root = tmp_path_factory.mktemp("runs")
    made = {}

    def get(name):
        if name not in made:
            execute(prepare_run(tiny_cfg(root / name, *RUNS[name])))
            made[name] = root / name / "run"
        return made[name]

    return get


def run_outputs(model, batch, reward: bool):
    with torch.no_grad():
        if reward:
            return last_token_scores(model, batch)
        return model(**batch).logits[batch["attention_mask"].bool()]


def check_batch(tokenizer):
    from alignkit.data.collate import pad_batch

    texts = ["What is 12 + 30?", "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"]
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    rows = [{"input_ids": ids, "completion_mask": [1] * len(ids)} for ids in encoded]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.mark.parametrize("name", list(RUNS))
def test_export_reloads_with_plain_transformers_and_gives_the_runs_outputs(runs, name):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    run_dir = runs(name)
    report = run_export([f"run={run_dir}", "export.dtype=float32"])
    out = run_dir / "export"
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "export.json"} <= files
    assert not any(f.startswith("adapter_") for f in files) and "value_head.safetensors" not in files
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    reward = name == "rm"
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    exported = cls.from_pretrained(out).eval()  # no peft, no alignkit
    assert exported.config.use_cache and ("generation_config.json" in files) != reward
    trained, tokenizer, _ = load_run(run_dir, torch.device("cpu"))
    trained.train()  # dropout is off; bitsandbytes' CPU 4-bit kernel differs in eval mode
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    batch = check_batch(tokenizer)
    expected, got = run_outputs(trained, batch, reward), run_outputs(exported, batch, reward)
    assert (got - expected).abs().max().item() <= 1e-4
    assert report["max_abs_diff_vs_run"] <= 1e-4
    assert json.loads((out / "export.json").read_text())["max_abs_diff_vs_run"] == report["max_abs_diff_vs_run"]
    if name in FOUR_BIT:  # the same adapter on the original full-precision weights is another model
        assert report["max_abs_diff_full_precision_base_vs_run"] > 1e-3


def test_bfloat16_export_reports_what_the_cast_costs(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    report = run_export([f"run={runs('lora')}", "export.dtype=bfloat16", f"export.dir={tmp_path / 'bf16'}"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert 1e-4 < report["max_abs_diff_vs_merged_fp32"] < 1.0
    assert report["size_mb"] < run_export([f"run={runs('lora')}", "export.dtype=float32",
                                           f"export.dir={tmp_path / 'fp32'}"])["size_mb"]


@pytest.mark.parametrize("kind,bound", [("f32", 1e-4), ("f16", 5e-3), ("q8_0", 0.5)])
def test_gguf_export_loads_back_in_transformers(runs, tmp_path, kind, bound):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.runs.read import merged_model

    run_dir = runs("dora")
    out = tmp_path / kind
    report = run_export([f"run={run_dir}", "export.format=gguf", f"export.gguf_type={kind}", f"export.dir={out}"])
    name = report["file"]
    assert name.endswith(f".{kind}.gguf") and sorted(p.name for p in out.iterdir()) == ["export.json", name]
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
    merged, original = merged_model(run_dir, load_saved_config(run_dir / "config.yaml"), "lm")
    for text in ["What is 7 * 6?", "Héllo, wörld 123 <|im_start|>user\nhi<|im_end|>\n"]:
        assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert tokenizer.chat_template == original.chat_template
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == \
        (original.eos_token, original.bos_token, original.pad_token)
    batch = check_batch(original)
    diff = (run_outputs(loaded, batch, False) - run_outputs(merged, batch, False)).abs().max().item()
    assert diff <= bound and report["max_abs_diff_vs_merged_fp32"] <= bound
    if kind != "f32":  # rounded: a real difference, which the report shows
        assert diff > 1e-4 and report["max_abs_diff_vs_merged_fp32"] > 1e-4


def test_permutation_is_what_transformers_gguf_loader_undoes():
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from alignkit.export.gguf import permute_rotary

    w = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)
    for heads, kv in ((4, 4), (4, 2)):
        processor = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv})
        name = "blk.0.attn_k.weight" if kv != heads else "blk.0.attn_q.weight"
        back = processor.process(permute_rotary(w, kv), name).weights
        np.testing.assert_array_equal(back, w)
        assert not np.array_equal(permute_rotary(w, kv), w)


def test_gguf_refuses_what_its_writer_does_not_lay_out():
    from types import SimpleNamespace

    from transformers import GPT2Config, LlamaConfig

    from alignkit.errors import UsageError
    from alignkit.export.gguf import check_llama

    check_llama(SimpleNamespace(config=LlamaConfig()))
    with pytest.raises(UsageError, match="writes Llama-architecture models; this one is gpt2"):
        check_llama(SimpleNamespace(config=GPT2Config()))
    scaled = LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(UsageError, match="rope scaling linear is not written"):
        check_llama(SimpleNamespace(config=scaled))


def test_policy_init_merges_any_mergeable_adapter(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignkit.runs.read import policy_init_dir

    run_dir = runs("vera")
    run_export([f"run={run_dir}", "export.dtype=float32", f"export.dir={tmp_path / 'x'}"])
    init = AutoModelForCausalLM.from_pretrained(policy_init_dir(run_dir)).eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "x").eval()
    for (name, a), (_, b) in zip(init.state_dict().items(), exported.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def finished_run_of(tmp_path, *overrides):
    """A run dir that looks finished to export's checks (config.yaml + final/)."""
    run_dir = tmp_path / "fake"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(compose("model=tiny", *overrides,
                                                                   f"run.dir={run_dir}")))
    return run_dir


@pytest.mark.parametrize("adapter", ["prompt", "prefix"])
def test_prompt_and_prefix_cannot_merge(tmp_path, adapter):
    done = alignkit("export", f"run={finished_run_of(tmp_path, f'adapter={adapter}')}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr
    assert f"adapter={adapter} cannot be merged" in lines[0] and "alignkit generate run=RUN" in lines[0]


@pytest.mark.parametrize("args,message", [
    ([], "alignkit export needs run=RUN_DIR"),
    (["run={tmp}/nothing"], "is not a finished alignkit run"),
    (["run={rm}", "export.format=gguf"], "export.format=gguf writes language models"),
    (["run={lora}", "train.lr=1"], "alignkit export takes run=RUN_DIR and export.* keys"),
    (["run={lora}", "export.gguf_type=q4"], "Invalid value 'q4'"),
    (["run={lora}", "export.frobnicate=1"], "Key 'frobnicate' not in 'ExportConfig'"),
    (["run={lora}", "export.check_rows=0"], "export.check_rows=0 is out of range"),
    (["run={lora}", "--fast"], "takes no option --fast"),
])
def test_bad_export_input_is_one_line_and_exit_2(tmp_path, args, message):
    run_dir = finished_run_of(tmp_path, "method=sft")
    rm = finished_run_of(tmp_path / "rm", "method=rm")
    done = alignkit("export", *[a.format(tmp=tmp_path, rm=rm, lora=run_dir) for a in args])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert not (run_dir / "export").exists()


def test_an_existing_export_is_never_written_over_silently(runs, tmp_path):
    source = runs("lora")
    run_dir = tmp_path / "copy"
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "export", ignore_errors=True)
    (run_dir / "export").mkdir()
    (run_dir / "export" / "mine.txt").write_text("keep")
    done = alignkit("export", f"run={run_dir}")
    assert done.returncode == 2 and "already exists and is not empty" in done.stderr
    assert (run_dir / "export" / "mine.txt").read_text() == "keep"
    done = alignkit("export", f"run={run_dir}", "export.overwrite=true")
    assert done.returncode == 0, done.stderr
    assert not (run_dir / "export" / "mine.txt").exists() and (run_dir / "export" / "model.safetensors").exists()
    assert "max_abs_diff_vs_run" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_gguf_of_the_embedded_smollm2_round_trips(tmp_path, kind):
    """The real byte-level BPE tokenizer (merges, digits split one by one) and a tied output head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.methods import compose as compose_config
    from alignkit.runs.read import merged_model

    run_dir = tmp_path / "run"
    cfg = compose_config(["model.path=alignkit:smollm2-135m-instruct", "method=sft", "train.max_steps=2",
                          "data.limit=16", "data.max_length=128", f"run.dir={run_dir}"])
    execute(prepare_run(cfg))
    report = run_export([f"run={run_dir}", "export.format=gguf", f"export.gguf_type={kind}"])
    out = run_dir / "export-gguf"
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=report["file"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=report["file"])
    merged, original = merged_model(run_dir, load_saved_config(run_dir / "config.yaml"), "lm")
    assert merged.config.tie_word_embeddings and loaded.config.tie_word_embeddings
    for text in ["What is 1234 * 56?", "Héllo, wörld!\n\n  spaces <|im_start|>user\nhi<|im_end|>\n"]:
        assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert tokenizer.chat_template == original.chat_template
    batch = check_batch(original)
    expected, got = run_outputs(merged, batch, False), run_outputs(loaded, batch, False)
    diff = (got - expected).abs().max().item()
    if kind == "f32":
        assert diff <= 1e-4 and report["max_abs_diff_vs_merged_fp32"] <= 1e-4
    else:
        assert 1e-4 < diff < 5.0 and (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "qlora", "dora"])
def test_export_of_the_embedded_smollm2_reloads_with_the_runs_logits(tmp_path, adapter):
    """The real model in fp32. Its logits reach ~30 and its 30 layers carry large activations, so the unmerged
    adapter (W x + s B A x) and the merged weights ((W + sBA) x) round differently: both are compared with the
    run's model computed in float64 (the exact answer) and the export must be as close to it as the run's own
    fp32 model is. A 4-bit run's report gives what the quantised base costs."""
    from transformers import AutoModelForCausalLM

    from alignkit.methods import compose as compose_config

    run_dir = tmp_path / "run"
    cfg = compose_config(["model.path=alignkit:smollm2-135m-instruct", "method=sft", f"adapter={adapter}",
                          "train.max_steps=2", "data.limit=16", "data.max_length=128", f"run.dir={run_dir}"])
    execute(prepare_run(cfg))
    report = run_export([f"run={run_dir}", "export.dtype=float32"])
    numbers = {k: v for k, v in report.items() if k.startswith(("max_abs", "greedy"))}
    assert report["greedy_agreement_vs_run"] == 1.0
    if adapter == "qlora":  # the 4-bit kernel has no float64 path: the report's numbers only
        print(adapter, numbers)
        assert report["max_abs_diff_vs_run"] <= 1e-3 and report["max_abs_diff_full_precision_base_vs_run"] > 1e-2
        return
    trained, tokenizer, _ = load_run(run_dir, torch.device("cpu"))
    trained.train()  # dropout is off
    batch = check_batch(tokenizer)
    fp32 = run_outputs(trained, batch, False)
    exact = run_outputs(trained.double(), batch, False)
    exported = run_outputs(AutoModelForCausalLM.from_pretrained(run_dir / "export").eval(), batch, False).double()
    run_error, export_error = (fp32.double() - exact).abs().max().item(), (exported - exact).abs().max().item()
    print(adapter, numbers, {"run_fp32_vs_fp64": run_error, "export_vs_fp64": export_error,
                             "export_vs_run": (exported - fp32.double()).abs().max().item(),
                             "logit_scale": exact.abs().max().item()})
    assert export_error <= max(1e-4, 1.5 * run_error)
