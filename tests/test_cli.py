"""The CLI end to end, through a subprocess, exactly as a user types it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

EXE = Path(sys.executable).parent / "alignkit"
CMD = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "alignkit"]


def alignkit(*args, cwd=None):
    return subprocess.run([*CMD, *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_dpo_lora_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    done = alignkit("train", "method=dpo", "adapter=lora", *TINY, f"run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    assert str(run_dir) in done.stderr
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "final" / "adapter_config.json").exists()
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    assert (run_dir / "final" / "tokenizer_config.json").exists()
    lines = metrics(run_dir)
    assert lines[0]["step"] == 1 and "rewards/accuracies" in lines[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_steps"] == 2 and summary["peak_rss_mb"] > 0
    assert "eval/loss" in summary


BAD = [
    (["method.betta=1"], "Key 'betta' not in 'DPOMethod'"),
    (["method=foo"], "Could not find 'method/foo'"),
    (["adapter=prompt"], "Could not find 'adapter/prompt'"),
    (["train.batch_size=many"], "could not be converted to Integer"),
    (["train.optimizer=sgd"], "Invalid value 'sgd'"),
    (["method.beta=0,1"], "is a sweep: add -m"),
    (["method.beta=["], "bad override 'method.beta=['"),
    (["method.beta=-1"], "method.beta=-1.0 is out of range"),
    (["data.path=/nonexistent/prefs.jsonl"], "no such file"),
    (["model.path=/nonexistent/model"], "no such file or directory"),
    (["model.path=alignkit:nope"], "unknown built-in model"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["method=simpo", "method.precompute_ref=true"], "drop method.precompute_ref=true"),
    (["method.loss=cdpo"], "method.loss=cdpo needs a label_smoothing > 0"),
    (["method=rm", "method.center_coef=-1"], "method.center_coef=-1.0 is out of range"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, overrides, message):
    done = alignkit("train", "method=dpo", "model=tiny", f"run.dir={tmp_path / 'run'}", *overrides)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_malformed_data_row_names_its_line(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"\n')
    done = alignkit("train", "method=dpo", "model=tiny", f"data.path={data}", f"run.dir={tmp_path / 'run'}")
    assert done.returncode == 2 and "line 2: malformed JSON" in done.stderr


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


def test_multirun_sweep_runs_each_job(tmp_path):
    base = tmp_path / "sweep"
    done = alignkit("train", "-m", "method=dpo", "method.beta=0.1,0.5", *TINY, "train.max_steps=1",
                    f"run.dir={base}")
    assert done.returncode == 0, done.stderr
    betas = [float(json.loads(json.dumps(__import__("yaml").safe_load((base / str(i) / "config.yaml").read_text())))
                   ["method"]["beta"]) for i in (0, 1)]
    assert betas == [0.1, 0.5]
    assert all((base / str(i) / "summary.json").exists() for i in (0, 1))


def test_resume_after_a_crash_reproduces_the_metrics(tmp_path):
    args = ["method=dpo", *TINY, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=1",
            "data.eval_fraction=0"]
    full = tmp_path / "full"
    assert alignkit("train", *args, f"run.dir={full}").returncode == 0
    assert [p.name for p in (full / "checkpoints").iterdir()] == ["step-2"]
    # what a crash after step 2 leaves: the checkpoint and the first two metric lines
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "final")
    (crashed / "summary.json").unlink()
    (crashed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(full)[:2]))
    done = alignkit("train", *args, f"run.dir={crashed}", "run.resume=true")
    assert done.returncode == 0, done.stderr
    for want, got in zip(metrics(full), metrics(crashed)):
        assert got["step"] == want["step"]
        for key in ("loss", "grad_norm", "logps/chosen", "rewards/margins", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    changed = alignkit("train", *args, "train.lr=0.5", f"run.dir={tmp_path / 'full2'}")
    assert changed.returncode == 0
    other = alignkit("train", *args, "method.beta=0.3", f"run.dir={crashed}", "run.resume=true")
    assert other.returncode == 2  # finished run: nothing to resume
