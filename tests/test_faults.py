"""Faults: SIGKILL while saving, Ctrl-C, NaN steps, a full disk, overwriting a run, a killed download."""
import errno
import json
import math
import os
import random
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.session.rundir import checkpoints
from alignkit.train import execute, prepare_run

from conftest import CMD, TINY, alignkit, compose, metrics, patch_method, tiny_cfg

# 24 steps (two epochs of 12), a checkpoint after every step: a kill lands in or near a save
RESUMABLE = [*TINY, "train.max_steps=24", "train.save_every=1", "train.keep_checkpoints=3", "data.eval_fraction=0"]
TIMING = ("tokens_per_s", "samples_per_s", "gen_tokens_per_s", "time/generation", "time/update")


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*CMD, "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())


def wait_until(ready, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited {proc.returncode} early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def newest_step(run_dir: Path) -> int:
    found = checkpoints(run_dir)
    return int(found[-1].name.split("-")[1]) if found else 0


def assert_whole_checkpoints(run_dir: Path) -> None:
    """Every step-N is complete and loadable; only safetensors and JSON are ever written."""
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        state = json.loads((ckpt / "state.json").read_text())
        assert state["step"] == int(ckpt.name.split("-")[1])
        for name in ("trainable", "optimizer", "rng"):
            assert load_file(ckpt / f"{name}.safetensors"), (ckpt, name)
    pickles = [p for p in run_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert not pickles


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]  # no step twice, none missing
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in set(w) - set(TIMING):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (w["step"], key)


# PPO with the options no other test runs: several minibatches, the adaptive KL controller (its
# coefficient is part of the checkpoint), the k3 estimator and unwhitened advantages
PPO_OPTIONS = ("train.max_steps=12", "reward=gold", "method.max_new_tokens=6", "method.ppo_epochs=2",
               "method.num_minibatches=2",
               "method.adaptive_kl=true", "method.kl_horizon=20", "method.kl_estimator=k3",
               "method.whiten_advantages=false")


# GRPO with the options whose state a resume must restore: num_iterations (one generation, two optimizer steps
# on it, old log-probs kept), dynamic sampling (extra prompts drawn per step), the KL term's reference
GRPO_OPTIONS = ("train.max_steps=12", "reward=functions",
                f"reward.functions=[{Path(__file__).parent / 'rewards.py'}:letters]", "method.max_new_tokens=6",
                "method.num_generations=2", "method.num_iterations=2", "method.dynamic_sampling=true",
                "method.beta=0.05", "method.micro_batch_size=2")


@pytest.mark.parametrize("method,kills,options", [("sft", 1, ()), ("dpo", 2, ()), ("rm", 1, ()),
                                                  ("ppo", 1, PPO_OPTIONS), ("grpo", 1, GRPO_OPTIONS)],
                         ids=["sft", "dpo", "rm", "ppo", "grpo"])
def test_sigkill_while_saving_leaves_whole_checkpoints_and_resume_reproduces_the_run(tmp_path, method, kills,
                                                                                     options):
    args = [f"method={method}", *RESUMABLE, *options]
    execute(prepare_run(compose(*args, f"run.dir={tmp_path / 'ref'}")))  # uninterrupted, in this process
    run_dir = tmp_path / "run"
    kills_at = []  # (the step whose save we wait for, then seconds): printed when an assertion fails
    for attempt in range(kills):
        proc = start(*args, f"run.dir={run_dir}", *(["run.resume=true"] if attempt else []))
        target = random.randint(newest_step(run_dir) + 1, newest_step(run_dir) + 8)
        saving = run_dir / "checkpoints"
        wait_until(lambda: newest_step(run_dir) >= target or any(saving.glob(f".tmp-step-{target}-*")), proc,
                   poll=0.001)
        kills_at.append((target, random.uniform(0, 0.01)))  # a save takes a few ms, a step tens
        time.sleep(kills_at[-1][1])
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert not (run_dir / "summary.json").exists(), f"finished before the kill {kills_at}"
        assert_whole_checkpoints(run_dir)
    resumed = alignkit("train", *args, f"run.dir={run_dir}", "run.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout, kills_at
    assert_whole_checkpoints(run_dir)
    assert not list((run_dir / "checkpoints").glob(".*"))  # temp dirs of killed saves are cleaned up
    assert_same_metrics(metrics(run_dir), metrics(tmp_path / "ref"))


def test_ctrl_c_saves_a_checkpoint_and_the_hint_resumes_the_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = start("method=sft", *RESUMABLE, "train.save_every=0", f"run.dir={run_dir}")
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text(), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    hint = stderr.strip().splitlines()[-1]
    assert hint.endswith("run.resume=true") and "Traceback" not in stderr, stderr
    (checkpoint,) = (run_dir / "checkpoints").iterdir()  # save_every=0: this one is the interrupt's
    assert f"checkpoint {checkpoint}" in hint
    command = shlex.split(hint.split("to continue: ", 1)[1])
    assert command[0] == "alignkit"
    resumed = subprocess.run([*CMD, *command[1:]], capture_output=True, text=True, env=os.environ.copy())
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 25))
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == 0


def poison(monkeypatch, bad_steps: set[int]):
    """The SFT loss becomes NaN on the given (1-based) optimizer steps; returns the call log."""
    from alignkit.methods import METHODS

    real, calls = METHODS["sft"].step, []

    def step(model, batch, denominator, method=None):
        calls.append(1)
        loss, stats = real(model, batch, denominator)
        return (loss * float("nan"), stats) if len(calls) in bad_steps else (loss, stats)

    patch_method(monkeypatch, "sft", step=step)
    return calls


def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    poison(monkeypatch, {2, 3})
    run = prepare_run(tiny_cfg(tmp_path, "method=sft", "train.max_steps=5", "data.eval_fraction=0",
                               "train.max_bad_steps=3"))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    summary = execute(run)
    assert summary["skipped_steps"] == 2 and math.isfinite(summary["loss"])
    lines = metrics(tmp_path / "run")
    assert [m["skipped_steps"] for m in lines] == [0, 1, 2, 2, 2]
    assert "loss" not in lines[1] and all(math.isfinite(m["loss"]) for m in lines if "loss" in m)
    for name, p in run.model.named_parameters():
        if name in before:
            assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name


def test_too_many_bad_steps_in_a_row_stop_with_one_line_and_keep_the_checkpoint(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {3, 4, 5, 6})
    run_dir = tmp_path / "run"
    code = main(["train", "method=sft", *TINY, "train.max_steps=8", "train.save_every=1", "train.max_bad_steps=2",
                 f"run.dir={run_dir}"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("alignkit: error: stopped at step 4: 2 steps in a row had a NaN/inf loss"), error
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'step-3'}" in error
    assert_whole_checkpoints(run_dir)
    assert not (run_dir / "summary.json").exists() and not (run_dir / "final").exists()


def test_disk_full_while_saving_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    import alignkit.session.checkpoint as checkpoint

    real = checkpoint.save_file

    def full_at_step_3(tensors, path, *a, **k):
        if ".tmp-step-3-" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", full_at_step_3)
    run_dir = tmp_path / "run"
    args = ["train", "method=dpo", *TINY, "train.max_steps=5", "train.save_every=1", f"run.dir={run_dir}"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == (f"alignkit: error: cannot write {run_dir / 'checkpoints' / 'step-3'}: No space left on "
                         f"device (free some disk space and run again; run.resume=true continues from the last "
                         f"checkpoint)")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-1", "step-2"]  # no temp dir
    assert_whole_checkpoints(run_dir)
    assert not (run_dir / "summary.json").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert main([*args, "run.resume=true"]) == 0
    assert [m["step"] for m in metrics(run_dir)][:5] == [1, 2, 3, 4, 5]


def test_overwrite_replaces_a_finished_run_only_once_the_new_one_finishes(tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    run_dir = tmp_path / "run"
    args = ["train", "method=sft", *TINY, "train.max_steps=1", f"run.dir={run_dir}"]
    assert main(args) == 0
    first = (run_dir / "summary.json").read_text()
    assert main([*args, "train.lr=0.5"]) == 2
    assert "run.overwrite=true" in capsys.readouterr().err

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PeftModel, "save_pretrained", disk_full)
    assert main([*args, "train.lr=0.5", "run.overwrite=true"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in error and error.endswith(f"the earlier run in {run_dir} kept")
    assert (run_dir / "summary.json").read_text() == first  # the old run is back, whole
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    assert main([*args, "train.lr=0.5", "run.overwrite=true"]) == 0
    assert (run_dir / "summary.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_ppo_skips_nan_rewards_and_stops_after_max_bad_steps(tmp_path):
    from alignkit.errors import UsageError

    run = prepare_run(tiny_cfg(tmp_path, "method=ppo", "reward=gold", "method.max_new_tokens=4",
                               "train.max_steps=4", "train.max_bad_steps=2", "data.eval_fraction=0"))
    run.reward_fn = lambda rows, texts: torch.full((len(texts),), float("nan"))
    with pytest.raises(UsageError, match="stopped at step 2: 2 steps in a row"):
        execute(run)
    assert [m["skipped_steps"] for m in metrics(tmp_path / "run")] == [1]


def test_ppo_ctrl_c_saves_a_checkpoint_after_the_step(tmp_path):
    from alignkit.errors import Interrupted

    run = prepare_run(tiny_cfg(tmp_path, "method=ppo", "reward=gold", "method.max_new_tokens=4",
                               "train.max_steps=4", "data.eval_fraction=0"))
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    calls = []

    def reward(rows, texts):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 2
        return torch.zeros(len(texts))

    run.reward_fn = reward
    with pytest.raises(Interrupted) as caught:
        execute(run)
    assert caught.value.step == 2 and caught.value.checkpoint == tmp_path / "run" / "checkpoints" / "step-2"
    assert_whole_checkpoints(tmp_path / "run")
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2]
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C behaves as before again


def test_a_killed_download_is_cleaned_up_and_fetched_again(tmp_path, monkeypatch):
    from alignkit.models.load import resolve_model_dir

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    models = tmp_path / "models"
    stale = models / ".tiny.99999999.x1y2"  # the temp dir of a process that is gone
    live = models / f".tiny.{os.getpid()}.busy"  # one a running process is still writing
    incomplete = models / "tiny"  # an entry renamed by older code, or copied in half, without config.json
    for folder in (stale, live, incomplete):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    entry = Path(resolve_model_dir("alignkit:tiny"))
    assert entry == incomplete and (entry / "config.json").exists()
    assert load_file(entry / "model.safetensors")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in models.iterdir()) == [live.name, "tiny"]


def test_pickled_weights_load_with_allow_pickle(tmp_path):
    from alignkit.models.load import load_base_model, resolve_model_dir

    tiny = Path(resolve_model_dir("alignkit:tiny"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny / "model.safetensors"), pickled / "pytorch_model.bin")
    cfg = tiny_cfg(tmp_path, f"model.path={pickled}", "model.allow_pickle=true")
    model, _, _ = load_base_model(cfg.model, torch.device("cpu"))
    expected = load_file(tiny / "model.safetensors")["lm_head.weight"]
    torch.testing.assert_close(model.lm_head.weight.detach(), expected)


def test_resume_drops_log_lines_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    from alignkit.session.logs import truncate_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    truncate_jsonl(log, 2)
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


def test_loading_trusts_no_remote_code_and_no_pickles_unless_set(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.models.load import load_base_model

    seen = []
    for cls in (AutoTokenizer, AutoModelForCausalLM):
        real = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained",
                            classmethod(lambda c, *a, _real=real, **k: seen.append(k) or _real(c, *a, **k)))
    cfg = tiny_cfg(tmp_path)
    load_base_model(cfg.model, torch.device("cpu"))
    assert [k["trust_remote_code"] for k in seen] == [False, False]
    assert seen[1]["use_safetensors"] is True


def test_a_reward_model_on_another_base_with_the_same_tokenizer_is_accepted(tmp_path, tiny_tokenizer):
    from omegaconf import OmegaConf

    from alignkit.models.load import resolve_model_dir
    from alignkit.runs.reward import reward_run

    other_base = tmp_path / "copy_of_tiny"  # another model dir (so another base), the same vocabulary
    other_base.mkdir()
    for f in Path(resolve_model_dir("alignkit:tiny")).iterdir():
        (other_base / f.name).write_bytes(f.read_bytes())
    rm_dir = tmp_path / "rm"
    tiny_tokenizer.save_pretrained(rm_dir / "final")
    rm_cfg = compose("method=rm", f"model.path={other_base}", f"run.dir={rm_dir}")
    (rm_dir / "config.yaml").write_text(OmegaConf.to_yaml(rm_cfg))
    cfg = tiny_cfg(tmp_path, "method=ppo", f"reward.run={rm_dir}")
    assert reward_run(cfg, tiny_tokenizer)[0] == rm_dir


def test_resume_from_a_path_that_is_no_checkpoint_is_one_line(tmp_path):
    done = alignkit("train", "method=sft", *TINY, f"run.dir={tmp_path / 'run'}",
                    f"run.resume={tmp_path / 'nowhere' / 'step-3'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"alignkit: error: run.resume={tmp_path / 'nowhere'}")
