"""KTO: the loss by hand, the step against lone forwards, packing, accumulation, the precomputed reference,
the reference point over several processes, eval and the recipe."""
import json
import math

import pytest
import torch

from alignkit.data.tasks import arithmetic_rows
from alignkit.eval.run import run_eval
from alignkit.objectives import kl_point, kto_loss
from alignkit.recipe.run import run_recipe
from alignkit.train import execute, prepare_run

from conftest import TINY, metrics, tiny_cfg
from test_packing import plain_logp
from test_recipe import FAST

sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def test_kto_loss_on_four_rows_with_the_mismatched_pair_kl_by_hand():
    # rows 0..3 labelled desirable, undesirable, desirable, undesirable; beta 0.5, weights 1 (desirable), 2
    # mismatched pairs (x_i, y_{i-1}): policy and reference summed log-probs, log-ratios 0.4, -0.2, 1.0, 0.6
    policy_kl, ref_kl = torch.tensor([-10.0, -12.2, -8.0, -9.4]), torch.tensor([-10.4, -12.0, -9.0, -10.0])
    z = kl_point(float((policy_kl - ref_kl).sum()), 4)
    assert z == pytest.approx(0.45)  # (0.4 - 0.2 + 1.0 + 0.6) / 4
    # rows: rho = policy - reference = 1.45, -0.55, 0.45, 2.45
    policy, ref = torch.tensor([-3.55, -6.55, -4.0, -2.0]), torch.tensor([-5.0, -6.0, -4.45, -4.45])
    desirable = torch.tensor([True, False, True, False])
    losses, rewards = kto_loss(policy, ref, desirable, z, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    expected = [1 - sigmoid(0.5 * (1.45 - 0.45)),        # 1 - sigma(0.5)  = 0.377541
                2 * (1 - sigmoid(0.5 * (0.45 + 0.55))),  # 2 (1 - sigma(0.5)) = 0.755082
                1 - sigmoid(0.0),                        # 0.5
                2 * (1 - sigmoid(0.5 * (0.45 - 2.45)))]  # 2 (1 - sigma(-1)) = 1.462117
    assert losses.tolist() == pytest.approx([0.377541, 0.755082, 0.5, 1.462117], abs=1e-6)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert losses.mean().item() == pytest.approx(0.773685, abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.725, -0.275, 0.225, 1.225], abs=1e-6)
    # APO-zero (unpaired) has no reference point: desirable 1 - sigma(beta rho), undesirable sigma(beta rho)
    apo, _ = kto_loss(policy, ref, desirable, z, 0.5, 1.0, 2.0, loss_type="apo_zero_unpaired")
    assert apo.tolist() == pytest.approx([1 - sigmoid(0.725), 2 * sigmoid(-0.275), 1 - sigmoid(0.225),
                                          2 * sigmoid(1.225)], abs=1e-6)


def test_the_reference_point_is_clamped_at_zero_and_carries_no_gradient():
    assert kl_point(-1.2, 4) == 0.0 and kl_point(0.0, 0) == 0.0 and kl_point(2.0, 4) == 0.5
    policy = torch.tensor([-2.0, -3.0], requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-2.0, -3.0]), torch.tensor([True, False]), 0.0, beta=0.1)
    assert losses.tolist() == pytest.approx([0.5, 0.5])
    losses.sum().backward()  # d/d rho of 1 - sigma(beta rho) at 0 is -beta/4; of 1 - sigma(-beta rho): +beta/4
    assert policy.grad.tolist() == pytest.approx([-0.025, 0.025])


def mixed(examples, n=4):
    """n examples alternating desirable and undesirable."""
    good, bad = [e for e in examples if e["label"]], [e for e in examples if not e["label"]]
    return [x for pair in zip(good, bad) for x in pair][:n]


def lone_pairs(examples, max_length):
    """(x_i, y_{i-1}) written out independently of the collate."""
    out = []
    for i, e in enumerate(examples):
        n_prompt, other = e["completion_mask"].index(1), examples[i - 1]["completion_ids"]
        out.append({"input_ids": (e["input_ids"][:n_prompt] + other)[:max_length],
                    "completion_mask": ([0] * n_prompt + [1] * len(other))[:max_length]})
    return out


def lift(model, batch, steps: int = 3, lr: float = 1e-3) -> None:
    """A few Adam steps up the log-likelihood of every sequence of the batch (rows and their pairs): the
    policy then likes completions more than its reference does, so the reference point is above 0."""
    from alignkit.forward.logps import sequence_logps

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (-sequence_logps(model, batch)[0].sum()).backward()
        optimizer.step()
    model.zero_grad()


@pytest.mark.parametrize("packed", [True, False])
def test_step_matches_lone_forwards(tmp_path, packed):
    """Loss, reference point, rewards and log-probs from plain one-sequence forwards of the rows and their
    mismatched pairs, policy (adapter moved) and reference (adapter off), with the formulas written out."""
    run = prepare_run(tiny_cfg(tmp_path, "method=kto", "method.beta=0.5", "method.undesirable_weight=2.0",
                               f"train.packing={packed}"))
    examples = mixed(run.train_examples)
    batch = run.collate(examples)
    lift(run.model, batch)
    assert ("packed" in batch) == packed
    loss, stats = run.step_fn(run.model, batch, 4)
    pairs = lone_pairs(examples, run.cfg.data.max_length)
    with torch.no_grad():
        pol, pol_kl = [plain_logp(run.model, s) for s in examples], [plain_logp(run.model, s) for s in pairs]
        with run.model.disable_adapter():
            ref, ref_kl = [plain_logp(run.model, s) for s in examples], [plain_logp(run.model, s) for s in pairs]
    z = max(sum(p - r for p, r in zip(pol_kl, ref_kl)) / 4, 0.0)
    rho = [p - r for p, r in zip(pol, ref)]
    assert z > 0.01 and max(abs(r) for r in rho) > 0.1  # the adapter moved: nothing trivial
    want = [1 - sigmoid(0.5 * (r - z)) if e["label"] else 2 * (1 - sigmoid(0.5 * (z - r))) for r, e in zip(rho, examples)]
    assert loss.item() == pytest.approx(sum(want) / 4, abs=1e-5)
    good = [i for i, e in enumerate(examples) if e["label"]]
    bad = [i for i in range(4) if i not in good]
    mean = lambda values, idx: sum(values[i] for i in idx) / len(idx)  # noqa: E731
    expected = {"kl": z, "rewards/chosen": 0.5 * mean(rho, good), "rewards/rejected": 0.5 * mean(rho, bad),
                "logps/chosen": mean(pol, good), "logps/rejected": mean(pol, bad),
                "rewards/margins": 0.5 * (mean(rho, good) - mean(rho, bad))}
    got = {k: float(v) / 4 for k, v in stats.items()}  # the loop divides the sums by the step's rows
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)
    loss.backward()  # the gradient flows through the rows only (the reference point is detached)
    assert all(p.grad is not None for p in run.model.parameters() if p.requires_grad)


def test_a_stand_in_batch_adds_nothing_to_the_reference_point(tmp_path):
    run = prepare_run(tiny_cfg(tmp_path, "method=kto"))
    batch = run.collate(run.train_examples[:2])
    lift(run.model, batch)
    assert float(run.step_fn(run.model, batch, 2)[1]["kl"]) != 0.0
    assert float(run.step_fn(run.model, {**batch, "stand_in": True}, 2)[1]["kl"]) == 0.0


def test_accumulation_gives_the_big_batch_numbers(tmp_path):
    """batch 4 == 2 x 2 accumulated: the loss over the step's rows, the class means over the step's classes."""
    data = tmp_path / "alternating.jsonl"  # labels true, false, true, ... in file order (train.shuffle=false)
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"],
                                        "label": bool(i % 2)}) + "\n" for i, r in enumerate(arithmetic_rows(8, 0))))
    results = []
    for i, (bs, ga) in enumerate([(4, 1), (2, 2)]):
        run = prepare_run(tiny_cfg(tmp_path / str(i), "method=kto", f"data.path={data}", "train.shuffle=false",
                                   f"train.batch_size={bs}", f"train.grad_accum={ga}", "train.max_steps=1",
                                   "data.eval_fraction=0"))
        execute(run)
        results.append(metrics(run.run_dir)[0])
    big, accumulated = results
    assert {"logps/chosen", "logps/rejected", "rewards/margins"} <= set(big)  # both classes in the step
    for key in ("loss", "grad_norm", "kl", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/margins"):
        assert accumulated[key] == pytest.approx(big[key], rel=1e-4, abs=1e-6), key


def test_precomputed_reference_gives_the_live_numbers(tmp_path, monkeypatch):
    """Unshuffled, each batch is one block of fixed partners: the cached reference (and its pairs) give the
    numbers of the live reference over 3 steps and the held-out evaluation; no reference runs while training."""
    common = ("method=kto", "train.shuffle=false", "train.max_steps=3", "data.eval_fraction=0.2")
    cached = prepare_run(tiny_cfg(tmp_path / "cached", *common, "method.precompute_ref=true"))
    calls = []
    original = cached.model.disable_adapter
    monkeypatch.setattr(cached.model, "disable_adapter", lambda: calls.append(1) or original())
    execute(cached)
    n = len(cached.train_examples) + len(cached.eval_examples)
    assert len(calls) == math.ceil(n / cached.cfg.train.eval_batch_size)  # the cache pass only
    assert all("kl_completion_ids" in e for e in cached.train_examples)
    execute(live := prepare_run(tiny_cfg(tmp_path / "live", *common)))
    numbers = lambda line: {k: v for k, v in line.items() if not k.endswith("_per_s")}  # noqa: E731
    got, want = [numbers(x) for x in metrics(cached.run_dir)], [numbers(x) for x in metrics(live.run_dir)]
    assert len(got) == 4 and got[-1]["eval/kl"] > 0
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-5)


def test_two_processes_share_one_reference_point(tmp_path):
    """One prompt for every row: the mismatched pairs of 2 processes x 2 rows are those of 1 process x 4 rows,
    so with the reference point averaged over the processes both give the same curve."""
    from test_distributed import one_process, torchrun

    rows = [{"prompt": "Q:", "completion": f" answer {i}" + "!" * (i % 4), "label": i % 3 != 0} for i in range(9)]
    data = tmp_path / "one_prompt.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (*TINY, "method=kto", f"data.path={data}", "data.eval_fraction=0", "train.max_steps=-1")
    one_process(tmp_path / "one", *common, "train.batch_size=4")
    two = torchrun(*common, "train.batch_size=2", f"run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    numbers = lambda run: [{k: v for k, v in x.items() if not k.endswith("_per_s")} for x in metrics(run)]  # noqa: E731
    want, got = numbers(tmp_path / "one"), numbers(tmp_path / "two")
    assert [x["step"] for x in want] == [1, 2, 3] and want[1]["kl"] > 0  # 4, 4, 1 rows; z > 0 after a step
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-6)


def test_eval_of_a_full_run_with_its_base_as_reference(tmp_path):
    """adapter=full precomputes the reference (fixed partners) before training; eval recomputes it from the
    base. At lr 0 the policy is its base: loss 1/2, every reward and the reference point 0."""
    run = prepare_run(tiny_cfg(tmp_path, "method=kto", "adapter=full", "train.lr=0", "train.max_steps=1",
                               "data.eval_fraction=0.25"))
    assert execute(run)["loss"] == pytest.approx(0.5)
    assert (run.run_dir / "ref_logps.safetensors").exists()
    result = run_eval([f"run={run.run_dir}", "sample.num_prompts=1", "sample.max_new_tokens=2"])
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert result[key] == pytest.approx(0.0, abs=1e-4), key
    assert result["loss"] == pytest.approx(0.5) and result["logps/chosen"] < 0


def test_kto_recipe_runs_sft_then_kto_from_it(tmp_path):
    root = tmp_path / "kto"
    summaries = run_recipe("kto", [*FAST, f"run.dir={root}"])
    assert list(summaries) == ["sft", "kto"] and "kl" in summaries["kto"]
    assert "/policy-sft-" in summaries["kto"]["base_model"]  # KTO trained on (and against) the SFT policy
    report = (root / "report.md").read_text()
    assert "`kto` (kto): held-out `kl`" in report and "| kto | sft |" in report
    evaluated = json.loads((root / "kto" / "eval.json").read_text())
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "gold/score", "gold/score_ref"} <= set(evaluated)
