"""The CLI end to end, through a subprocess, exactly as a user types it."""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from alignkit.session.startup import PHASES
from conftest import CMD, TINY, alignkit, compose, metrics


def test_train_dpo_lora_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    launched = time.time()
    # through a shell that waits a second and then execs alignkit, as `cmd && alignkit ...` or a container's exec
    # does: the process exists from the fork, but its time to the first step starts at the exec
    done = subprocess.run(["bash", "-c", 'sleep 1 && exec "$@"', "_", *CMD, "train", "method=dpo", "adapter=lora",
                           *TINY, f"run.dir={run_dir}"], capture_output=True, text=True, env=os.environ.copy())
    finished = time.time()
    assert done.returncode == 0, done.stderr
    assert str(run_dir) in done.stderr
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "final" / "adapter_config.json").exists()
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    # the time to the first step, phase by phase, from alignkit's import
    startup = json.loads((run_dir / "summary.json").read_text())["startup"]
    marks = startup["marks"]
    assert launched + 1 <= marks["start"] <= marks["config"] and marks["first_step"] <= finished
    times = [marks["start"]] + [marks[p] for p in PHASES]
    assert times == sorted(times)
    assert [startup[f"{p}_s"] for p in PHASES] == pytest.approx(np.diff(times), abs=2e-3)
    assert startup["to_first_step_s"] == pytest.approx(marks["setup"] - marks["start"], abs=2e-3)
    assert "to_first_step_s" in done.stdout and "model_load" in done.stdout
    assert (run_dir / "final" / "tokenizer_config.json").exists()
    lines = metrics(run_dir)
    assert lines[0]["step"] == 1 and "rewards/accuracies" in lines[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_steps"] == 2 and summary["peak_rss_mb"] > 0
    assert "eval/loss" in summary


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    """The bad files and directories the table below names as {key}."""
    from safetensors.torch import load_file

    from alignkit.models.load import resolve_model_dir
    from alignkit.models.tiny import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("bad")
    row = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    rows = {"empty": [], "same": [{**row, "rejected": "4"}] * 3, "long": [{**row, "prompt": "x" * 600}] * 3,
            "nochosen": [row, {"prompt": "a", "rejected": "b"}]}
    for name, content in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in content))
    (root / "malformed.jsonl").write_text(json.dumps(row) + '\n{"prompt": "a"\n')
    tiny = resolve_model_dir("alignkit:tiny")
    shutil.copytree(tiny, root / "corrupt")
    (root / "corrupt" / "model.safetensors").write_bytes(os.urandom(4096))
    shutil.copytree(tiny, root / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(f"{tiny}/model.safetensors"), root / "pickled" / "pytorch_model.bin")
    (root / "junk.gguf").write_bytes(os.urandom(4096))
    # a finished reward-model run (as far as the checks look) on a base whose tokenizer has one more token
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<|extra|>"])
    shutil.copytree(tiny, root / "other_base")
    tokenizer.save_pretrained(root / "other_base")
    tokenizer.save_pretrained(root / "other_rm" / "final")
    write_config(root / "other_rm", "method=rm", f"model.path={root / 'other_base'}")
    # a run started with another learning rate; a finished run; a plain file; a directory that is no run
    write_config(root / "started", "method=dpo", "model=tiny", "train.lr=0.1")
    write_config(root / "finished", "method=dpo", "model=tiny")
    (root / "finished" / "summary.json").write_text("{}")
    (root / "afile").write_text("not a directory")
    (root / "notarun").mkdir()
    (root / "notarun" / "notes.txt").write_text("mine")
    return {p.name.split(".")[0]: str(p) for p in root.iterdir()}


def write_config(run_dir: Path, *overrides: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(compose(*overrides, f"run.dir={run_dir}")))


# overrides after `train method=dpo model=tiny run.dir=RUN` ({key}: a path made by the fixture), and the message
BAD = [
    (["method.betta=1"], "Key 'betta' not in 'DPOMethod'"),
    (["method=foo"], "Could not find 'method/foo'"),
    (["adapter=nope"], "Could not find 'adapter/nope'"),
    (["adapter=prefix", "train.gradient_checkpointing=true"], "adapter=prefix does not work with train.gradient_"),
    (["train.batch_size=many"], "could not be converted to Integer"),
    (["train.optimizer=sgd"], "Invalid value 'sgd'"),
    (["method.beta=0,1"], "is a sweep: add -m"),
    (["method.beta=["], "bad override 'method.beta=['"),
    (["method.beta=-1"], "method.beta=-1.0 is out of range"),
    (["train.lr=-1"], "train.lr=-1.0 is out of range"),
    (["adapter.r=0"], "adapter.r=0 is out of range"),
    (["train.max_bad_steps=0"], "train.max_bad_steps=0 is out of range"),
    (["method=grpo", "adapter=bitdelta"], "method=grpo does not run with adapter=bitdelta"),
    (["method=ppo"], "method=ppo needs a reward"),
    (["run.overwrite=true", "run.resume=true"], "set only one of them"),
    (["data.path=/nonexistent/prefs.jsonl"], "no such file"),
    (["data.path={empty}"], "no rows in"),
    (["data.path={malformed}"], "line 2: malformed JSON"),
    (["data.path={nochosen}"], "line 2: row has no 'chosen' field"),
    (["data.path={same}"], "'chosen' equals 'rejected' in every row"),
    (["data.path={long}"], "every row was dropped"),
    (["model.path=/nonexistent/model"], "no such file or directory"),
    (["model.path=alignkit:nope"], "unknown built-in model"),
    (["model.path={corrupt}"], "corrupt or truncated"),
    (["model.path={pickled}"], "pytorch_model.bin is a pickled weights file"),
    (["model.path={junk}"], "not a GGUF model"),
    (["method=ppo", "reward.run={other_rm}"], "whose tokenizer differs from the policy's"),
    (["run.dir={started}", "run.resume=true"], "the config differs"),
    (["run.dir={finished}", "run.resume=true"], "already finished"),
    (["run.dir={finished}"], "already exists and is not empty"),
    (["run.dir={notarun}", "run.overwrite=true"], "not an alignkit run"),
    (["run.dir={afile}/run"], "is a file, not a directory"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["method=simpo", "method.precompute_ref=true"], "drop method.precompute_ref=true"),
    (["method.loss=cdpo"], "method.loss=cdpo needs a label_smoothing > 0"),
    (["method=rm", "method.center_coef=-1"], "method.center_coef=-1.0 is out of range"),
    (["adapter=qlora", "adapter.init=pissa"], "adapter=qlora adapter.init=pissa: the 4-bit base would hold"),
    (["adapter=qlora", "adapter.init=olora"], "adapter=qlora adapter.init=olora: the 4-bit base would hold"),
    (["adapter.init=loftq"], "adapter.init=loftq is the quantisation-aware init of the 4-bit base"),
    (["adapter=dora", "adapter.init=pissa"], "adapter.use_dora=true with adapter.init=pissa"),
    (["adapter.init=svd"], "adapter.init=svd is not a LoRA init"),
    (["adapter.init=pissa_niter_0"], "adapter.init=pissa_niter_0 is not a LoRA init"),
    (["adapter=pissa", "train.strategy=fsdp"], "adapter.init=pissa does not run with train.strategy=fsdp"),
    (["adapter=loha", "train.loraplus_lr_ratio=16"], "train.loraplus_lr_ratio is LoRA+"),
    (["train.loraplus_lr_ratio=0"], "train.loraplus_lr_ratio=0.0 is out of range"),
    (["adapter=ia3", "adapter.target_modules=[nope]"], "adapter=ia3: peft refused the adapter"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, bad, overrides, message):
    args = [o.format(**bad) for o in overrides]
    given = [Path(a.split("=", 1)[1]) for a in args if a.startswith("run.dir=")]
    before = sorted(os.listdir(given[0])) if given and given[0].is_dir() else None
    default = [] if given else [f"run.dir={tmp_path / 'run'}"]
    done = alignkit("train", "method=dpo", "model=tiny", *default, *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert lines[0].startswith("alignkit: error: ") and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # nothing written, so nothing that looks finished
    if before is not None:
        assert sorted(os.listdir(given[0])) == before  # an earlier run is left as it was


def test_unknown_verb_and_existing_run_dir(tmp_path):
    assert alignkit("frobnicate").returncode == 2
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    done = alignkit("train", *TINY, f"run.dir={run_dir}")
    assert done.returncode == 2 and "already exists" in done.stderr
    assert (run_dir / "summary.json").read_text() == "{}"  # earlier output untouched


def test_list_and_help():
    listed = alignkit("list")
    assert listed.returncode == 0
    for word in ("method", "adapter", "qlora", "dpo", "tiny", "valid method x adapter", "rlhf", "sft -> rm -> ppo"):
        assert word in listed.stdout
    helped = alignkit("--help")
    assert helped.returncode == 0 and "alignkit train" in helped.stdout and "-m" in helped.stdout


def test_startup_record_is_empty_outside_alignkit_train():
    from alignkit.session import startup

    startup.end()
    startup.mark("config")  # a recipe stage or a test calling run_train directly: no start, nothing recorded
    assert startup.record() == {}
    startup.begin()
    startup.mark("config")
    startup.mark("config")  # the first mark of a phase counts
    startup.mark("model_load")  # phases not marked are left out
    got = startup.record()
    assert set(got) == {"config_s", "model_load_s", "marks"} and got["marks"]["config"] <= got["marks"]["model_load"]
    startup.end()


def test_multirun_sweep_runs_each_job(tmp_path):
    base = tmp_path / "sweep"
    done = alignkit("train", "-m", "method=dpo", "method.beta=0.1,0.5", *TINY, "train.max_steps=1",
                    f"run.dir={base}")
    assert done.returncode == 0, done.stderr
    betas = [float(yaml.safe_load((base / str(i) / "config.yaml").read_text())["method"]["beta"]) for i in (0, 1)]
    assert betas == [0.1, 0.5]
    first, second = (json.loads((base / str(i) / "summary.json").read_text())["startup"]["marks"] for i in (0, 1))
    assert first["first_step"] <= second["start"] <= second["config"]  # the next job starts where one ended


def test_an_unreachable_hub_is_noticed_at_once(monkeypatch):
    """No network: the hub check fails within its connect timeout instead of a minute of retries."""
    import time

    import huggingface_hub.constants

    from alignkit.models import hub

    hub.hub_offline.cache_clear()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    try:
        assert hub.hub_offline() is True
        assert time.monotonic() - started <= hub.CONNECT_TIMEOUT_S + 1
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # the libraries read only their local cache now
    finally:
        hub.hub_offline.cache_clear()


@pytest.mark.parametrize("key,value", [("model.path", "someorg/no-such-model"), ("data.path", "someorg/no-such-data")])
def test_a_hub_id_offline_is_one_line(tmp_path, monkeypatch, key, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    done = alignkit("train", "model=tiny", f"{key}={value}", f"run.dir={tmp_path / 'run'}")
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"alignkit: error: cannot load {key.split('.')[0]} '{value}' (the Hugging Face hub is "
                            f"not reachable"), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
