"""Several processes on the CPU (gloo), started with torchrun as a user types it.

p processes of batch b must give the numbers of one process of batch p*b over the same steps: the
losses, the eval, the checkpointed weights and optimizer state. The one-process runs go in-process.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.session.dist import share
from alignkit.session.batches import plan_steps
from alignkit.train import execute, prepare_run

from conftest import TINY, alignkit, metrics, tiny_cfg

# 42 rows, 9 held out: 33 train rows = global batches 8, 8, 8, 8, 1 (the last leaves process 1 a
# stand-in), eval batches 8 + 1 likewise; one epoch of 5 steps
SFT = (*TINY, "data.task_size=42", "data.eval_fraction=0.21", "train.max_steps=-1", "train.epochs=1")
DPO = (*TINY, "method=dpo", "train.max_steps=3", "data.eval_fraction=0.2")


def torchrun(*args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "alignkit", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())


def one_process(run_dir, *overrides):
    cfg = tiny_cfg(run_dir, *overrides)
    cfg.run.dir = str(run_dir)
    return execute(prepare_run(cfg))


def losses(run_dir, keys=("loss", "grad_norm")) -> list[tuple]:
    return [tuple(r.get(k) for k in ("step", *keys)) for r in metrics(run_dir) if "loss" in r]


def assert_same_curve(got: list[tuple], expected: list[tuple], atol=1e-6):
    assert [g[0] for g in got] == [e[0] for e in expected]  # the same steps
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-5, abs=atol), f"step {e[0]}"


def assert_same_tensors(a_file, b_file, atol=1e-4):
    """Weights by default: Adam's step lr * m / (sqrt(v) + eps) turns the rounding of a near-zero gradient
    into a visible part of a step, so a few of the 32768 LoRA weights differ by 1e-6..2e-5 after 2-5 steps
    at lr=1e-2 (the rest to 1e-7); 1% of one step bounds them. Optimizer moments agree to ~1e-9."""
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_same_outputs(a_run, b_run, step: int):
    """Two runs' step-N checkpoint (weights, optimizer moments) and final/ adapter."""
    for name, atol in (("trainable", 1e-4), ("optimizer", 1e-8)):
        assert_same_tensors(a_run / f"checkpoints/step-{step}/{name}.safetensors",
                            b_run / f"checkpoints/step-{step}/{name}.safetensors", atol)
    assert_same_tensors(a_run / "final/adapter_model.safetensors", b_run / "final/adapter_model.safetensors")


def test_share_cuts_a_global_batch_into_near_equal_contiguous_parts():
    rows = list(range(8))
    assert [share(rows, r, 2) for r in range(2)] == [([0, 1, 2, 3], 4), ([4, 5, 6, 7], 4)]
    assert [share([0, 1, 2], r, 2) for r in range(2)] == [([0, 1], 2), ([2], 1)]
    assert [share(list(range(5)), r, 3) for r in range(3)] == [([0, 1], 2), ([2, 3], 2), ([4], 1)]
    assert [share([7], r, 2) for r in range(2)] == [([7], 1), ([7], 0)]  # process 1: a stand-in, 0 real rows
    assert [share(rows, 0, 1)] == [(rows, 8)]


def test_plan_counts_global_batches():
    train = tiny_cfg(Path("."), "train.batch_size=4", "train.grad_accum=2", "train.max_steps=-1",
                     "train.epochs=2").train
    assert plan_steps(33, train, world=1) == (5, 10)  # 9 micro-batches of 4 -> 5 steps of 2
    assert plan_steps(33, train, world=2) == (3, 6)  # 5 global micro-batches of 8 -> 3 steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """sft, 1 process x batch 8 (checkpoint every step), and 2 processes x batch 4 under DDP."""
    root = tmp_path_factory.mktemp("dist")
    one_process(root / "one", *SFT, "train.batch_size=8", "train.save_every=1", "train.keep_checkpoints=5")
    two = torchrun(*SFT, "train.batch_size=4", "train.save_every=2", f"run.dir={root / 'ddp'}")
    assert two.returncode == 0, two.stderr[-3000:]
    return root, two


def test_two_processes_give_the_loss_curve_of_one_with_their_global_batch(runs):
    root, _ = runs
    one, two = losses(root / "one"), losses(root / "ddp")
    assert [s for s, *_ in one] == [1, 2, 3, 4, 5]
    assert len({round(x[1], 3) for x in one}) == 5  # the curve moves
    assert_same_curve(two, one)
    eval_one, eval_two = metrics(root / "one")[-1], metrics(root / "ddp")[-1]
    assert eval_two["eval/loss"] == pytest.approx(eval_one["eval/loss"], rel=1e-5)
    assert_same_outputs(root / "one", root / "ddp", step=2)


def test_only_rank_zero_writes_the_run(runs):
    root, two = runs
    run = root / "ddp"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 5]  # 5 steps + the eval line, once each
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "final", "heldout.json",
                                                     "metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["processes"], summary["strategy"]) == (2, "ddp")
    # throughput counts both processes' rows: 33 train rows over the run's train seconds
    assert summary["train_samples_per_s"] * summary["train_seconds"] == pytest.approx(33)
    assert two.stderr.count("alignkit: sft + lora") == 1


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    root, _ = runs
    one_process(tmp_path / "resumed", *SFT, "train.batch_size=8",
                f"run.resume={root / 'ddp/checkpoints/step-2'}")
    assert_same_curve(losses(tmp_path / "resumed"), losses(root / "ddp")[2:])


def test_a_run_continues_in_its_run_dir_with_another_process_count(runs, tmp_path):
    """Same config (batch_size per process): the global batch shrinks from 8 to 4, so the epoch has 9 steps
    instead of 5; the run goes on from its newest checkpoint (step 4) at data position step x 4."""
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "ddp", run, ignore=shutil.ignore_patterns("final", "summary.json"))
    one_process(run, *SFT, "train.batch_size=4", "train.save_every=2", "run.resume=true")
    assert [x["step"] for x in metrics(run) if "loss" in x] == list(range(1, 10))
    assert json.loads((run / "summary.json").read_text())["train_steps"] == 5


def test_fsdp_resumes_a_one_process_checkpoint_and_matches_it(runs):
    """FSDP2 on gloo: each process loads its shard of a 1-process checkpoint, trains, gathers its
    checkpoint and final/ to whole tensors equal to the 1-process run's."""
    root, _ = runs
    run = root / "fsdp"
    out = torchrun(*SFT, "train.batch_size=4", "train.strategy=fsdp", "train.save_every=1",
                   f"run.resume={root / 'one/checkpoints/step-2'}", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_curve(losses(run), losses(root / "one")[2:])
    assert_same_outputs(root / "one", run, step=3)


def test_launcher_torchrun_runs_dpo_on_two_processes_with_one_process_numbers(tmp_path):
    one_process(tmp_path / "one", *DPO, "train.batch_size=8")
    out = alignkit("train", *DPO, "train.batch_size=4", "launcher=torchrun", "nproc=2",
                   f"run.dir={tmp_path / 'two'}")
    assert out.returncode == 0, out.stderr[-3000:]
    keys = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen")
    one, two = losses(tmp_path / "one", keys), losses(tmp_path / "two", keys)
    assert len(one) == 3 and len({x[1] for x in one}) > 1
    # a reward margin is beta x a difference of ~180-nat float32 log-prob sums: ~1e-5 of rounding
    assert_same_curve(two, one, atol=1e-5)
    assert metrics(tmp_path / "two")[-1]["eval/loss"] == pytest.approx(metrics(tmp_path / "one")[-1]["eval/loss"],
                                                                       rel=1e-5)
    saved = (tmp_path / "two/config.yaml").read_text()
    assert "launcher: torchrun" in saved and "nproc: 2" in saved


def test_qlora_dpo_under_fsdp_matches_one_process(tmp_path):
    """The 4-bit weights are stored in the compute dtype (bnb_4bit_quant_storage) and sharded by FSDP2;
    bitsandbytes restores their quantisation state in each layer's forward."""
    one_process(tmp_path / "one", *DPO, "adapter=qlora", "train.batch_size=8")
    out = torchrun(*DPO, "adapter=qlora", "train.strategy=fsdp", "train.batch_size=4", f"run.dir={tmp_path / 'two'}")
    assert out.returncode == 0, out.stderr[-3000:]
    keys = ("loss", "grad_norm", "rewards/margins")
    assert_same_curve(losses(tmp_path / "two", keys), losses(tmp_path / "one", keys), atol=1e-5)
    # held out: one process evaluates with bitsandbytes' bf16 CPU inference kernel, FSDP with the fp32 training
    # one (the inference kernel repacks weights in place, which a gathered FSDP copy cannot keep)
    evals = [metrics(tmp_path / run)[-1]["eval/loss"] for run in ("one", "two")]
    assert evals[1] == pytest.approx(evals[0], rel=1e-4)
    assert_same_tensors(tmp_path / "one/final/adapter_model.safetensors",
                        tmp_path / "two/final/adapter_model.safetensors")


GRPO = ("reward=functions", f"reward.functions=[{Path(__file__).parent / 'rewards.py'}:letters]",
        "method.max_new_tokens=8", "method.num_generations=2", "method.scale_rewards=batch")


@pytest.mark.parametrize("method,extra", [("rm", ()), ("ppo", ("reward=gold", "method.max_new_tokens=8")),
                                          ("grpo", GRPO), ("rloo", GRPO[:-1])])
def test_rm_and_ppo_run_on_two_processes(tmp_path, method, extra):
    out = torchrun(*TINY, f"method={method}", *extra, f"run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = metrics(tmp_path)
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if "loss" in x)
    assert json.loads((tmp_path / "summary.json").read_text())["processes"] == 2
    assert (tmp_path / "final" / "adapter_config.json").exists()
    if method != "rm":
        assert {x["step"] for x in map(json.loads, (tmp_path / "samples.jsonl").read_text().splitlines())} == {1}
    if method in ("grpo", "rloo"):  # each process sampled whole groups of its own prompts
        assert all(x["completions/mean_length"] > 0 and "reward" in x for x in lines)


@pytest.mark.parametrize("overrides,message", [
    (("method=ppo", "reward=gold", "train.strategy=fsdp"), "method=ppo does not run with train.strategy=fsdp"),
    (("adapter=prompt", "train.strategy=fsdp"), "adapter=prompt does not run with train.strategy=fsdp"),
    (("adapter=bitdelta", "train.strategy=fsdp"), "adapter=bitdelta does not run with train.strategy=fsdp"),
    (("nproc=0",), "nproc=0 is out of range"),
])
def test_combinations_that_cannot_run_fail_before_any_process_starts(tmp_path, capsys, overrides, message):
    code = main(["train", *TINY, "launcher=torchrun", "nproc=2", *overrides, f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "starting" not in err and not (tmp_path / "run").exists()


def test_a_recipe_refuses_the_launcher(capsys):
    assert main(["recipe", "dpo", "launcher=torchrun", "nproc=2"]) == 2
    assert "alignkit recipe runs its stages in one process" in capsys.readouterr().err


@pytest.mark.parametrize("adapter", ["dora", "vera", "loha", "lokr", "ia3"])
def test_fsdp_trains_the_lora_family_with_one_process_numbers(tmp_path, adapter):
    """FSDP2 shards the new adapters' weights like LoRA's (VeRA's shared projections are buffers)."""
    args = (*TINY, f"adapter={adapter}", "train.max_steps=3", "data.eval_fraction=0")
    one_process(tmp_path / "one", *args, "train.batch_size=8")
    out = torchrun(*args, "train.batch_size=4", "train.strategy=fsdp", f"run.dir={tmp_path / 'fsdp'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_curve(losses(tmp_path / "fsdp"), losses(tmp_path / "one"))
    assert_same_tensors(tmp_path / "one/final/adapter_model.safetensors",
                        tmp_path / "fsdp/final/adapter_model.safetensors")


FIXED = Path(__file__).parent / "grpo_fixed.py"
CRITIC_FREE = (*TINY, "reward=functions", f"reward.functions=[{Path(__file__).parent / 'rewards.py'}:text_length]",
               "method.num_generations=3", "data.eval_fraction=0", "method.beta=0.1",
               "method.mask_truncated_completions=true")


@pytest.mark.parametrize("method,extra", [("grpo", ("method.loss_type=dapo", "method.scale_rewards=batch")),
                                          ("rloo", ("method.normalize_advantages=true",))], ids=["grpo", "rloo"])
def test_critic_free_on_two_processes_gives_the_numbers_of_one(tmp_path, monkeypatch, method, extra):
    """The same (deterministic) completions: 2 processes of 2 prompts = 1 process of 4 prompts. Each process
    holds whole groups; dapo's token mean, batch scaling and RLOO's normalisation count every process's
    completions (the processes hold different token counts, so a per-process mean would differ)."""
    from alignkit.methods import critic_free
    from grpo_fixed import fixed_completions

    monkeypatch.setattr(critic_free, "generate", fixed_completions)
    one_process(tmp_path / "one", f"method={method}", *CRITIC_FREE, *extra, "train.batch_size=4")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(FIXED),
               "train", *CRITIC_FREE, f"method={method}", *extra, "train.batch_size=2", f"run.dir={tmp_path / 'two'}"]
    out = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    keys = ("loss", "grad_norm", "reward", "reward_std", "kl", "completions/mean_length")
    one, two = losses(tmp_path / "one", keys), losses(tmp_path / "two", keys)
    assert len(one) == 2 and all(x[1] != 0 for x in one)
    assert_same_curve(two, one, atol=1e-6)
