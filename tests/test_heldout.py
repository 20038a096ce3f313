"""One held-out split over the raw rows, recorded in the run dir and used by eval, generate and compress."""
import json
import random

import pytest

from alignkit.data.load import load_rows
from alignkit.errors import UsageError
from alignkit.eval.run import held_out, run_eval
from alignkit.train import execute, prepare_run

from conftest import tiny_cfg


def prefs_with_dropped_rows(path, n=40):
    """Distinct prompts; every 7th row has chosen == rejected (dropped when encoded) and row 3 is too long."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"q{i} " + " ".join(rng.choice(["cat", "sun", "map"]) for _ in range(3)) + "?"
            if i == 3:
                prompt += " very long" * 40
            rejected = " yes" if i % 7 == 0 else " no"
            f.write(json.dumps({"prompt": prompt, "chosen": " yes", "rejected": rejected}) + "\n")
    return path


def test_eval_of_a_run_uses_exactly_its_held_out_rows(tmp_path):
    data = prefs_with_dropped_rows(tmp_path / "prefs.jsonl")
    run = prepare_run(tiny_cfg(tmp_path, "method=dpo", f"data.path={data}", "data.eval_fraction=0.25",
                               "data.max_length=100", "train.max_steps=2"))
    summary = execute(run)
    record = json.loads((run.run_dir / "heldout.json").read_text())
    assert record["rows"] == 40 and len(record["held_out"]) == 10
    rows = load_rows(run.cfg.data, run.cfg.train.seed)
    trained = {e["source"] for e in run.train_examples}
    assert trained.isdisjoint(record["held_out"])
    assert {e["source"] for e in run.eval_examples} <= set(record["held_out"])
    dropped = {i for i in range(40) if i % 7 == 0 or i == 3}
    assert trained | {e["source"] for e in run.eval_examples} == set(range(40)) - dropped
    _, held_rows = held_out(run.cfg, run.run_dir)
    assert [r for _, r in held_rows] == [rows[i][1] for i in record["held_out"]]
    # eval scores the same pairs training held out: the same numbers
    result = run_eval([f"run={run.run_dir}", "sample.num_prompts=1", "sample.max_new_tokens=2"])
    assert result["rewards/margins"] == pytest.approx(summary["eval/rewards/margins"], rel=1e-4, abs=1e-6)
    assert result["logps/chosen"] == pytest.approx(summary["eval/logps/chosen"], rel=1e-5)


def test_eval_refuses_data_that_changed_since_the_run(tmp_path):
    data = prefs_with_dropped_rows(tmp_path / "prefs.jsonl")
    run = prepare_run(tiny_cfg(tmp_path, "method=rm", f"data.path={data}", "data.eval_fraction=0.25",
                               "data.max_length=100", "train.max_steps=1"))
    execute(run)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(UsageError, match="data differs from what"):
        held_out(run.cfg, run.run_dir)
