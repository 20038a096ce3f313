"""A method is one file: a toy method registered here (a few lines, nothing edited outside this test) runs
through `alignkit list`, validation, `train`, `eval` and a recipe."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from alignkit.cli import main
from alignkit.data.collate import collate_sft
from alignkit.data.tokenize import encode_rows
from alignkit.errors import UsageError, require
from alignkit.forward.logps import counted_token_logps
from alignkit.methods import METHODS, compose, register, validate
from alignkit.methods.record import Method

from conftest import TINY, metrics


# ---- the toy method: a scaled completion NLL that also logs its token count ------------------------------
@dataclass
class ToyMethod:
    name: str = MISSING
    scale: float = MISSING


def toy_step(model, batch, denominator, method):
    lp, mask = counted_token_logps(model, batch)
    return -(lp * mask).sum() * method.scale / denominator, {"toy/tokens": mask.sum()}


def toy_prepare(cfg, tokenizer, rows):
    return encode_rows(tokenizer, rows, cfg.data, "sft"), partial(collate_sft, pad_id=tokenizer.pad_token_id)


def toy_check(cfg):
    require(cfg.method.scale > 0, "method.scale", cfg.method.scale, "must be > 0")


TOY = Method("toy", ToyMethod, data="sft", head="lm", adapters=("lora",), metrics=("loss", "toy/tokens"),
             prepare=toy_prepare, step=toy_step, reference=lambda m: False, check=toy_check)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.setattr("alignkit.methods.METHODS", dict(METHODS))  # registered for this test only
    import alignkit.methods

    register(TOY)
    assert alignkit.methods.METHODS["toy"] is TOY
    # the option's values, as configs/method/toy.yaml would hold them
    ConfigStore.instance().store(group="method", name="toy", node=ToyMethod(name="toy", scale=0.5))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "toy.yaml").write_text("description: the toy method alone\ndir: runs/recipe-toy\nshared: []\n"
                                      "stages:\n  toy:\n    overrides: [method=toy]\n    inputs: []\n")
    monkeypatch.setattr("alignkit.recipe.plan.recipe_dir", lambda: recipes)
    return TOY


def test_a_toy_method_is_listed_validated_trained_evaluated_and_in_a_recipe(toy, tmp_path, capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "toy" in listed and "toy/tokens" in listed

    validate(compose(["method=toy"]))
    with pytest.raises(UsageError, match="method.scale=0.0 is out of range"):
        validate(compose(["method=toy", "method.scale=0"]))
    with pytest.raises(UsageError, match="method=toy does not run with adapter=full"):
        validate(compose(["method=toy", "adapter=full"]))

    run_dir = tmp_path / "run"
    assert main(["train", "method=toy", *TINY, f"run.dir={run_dir}"]) == 0
    lines = metrics(run_dir)
    assert lines[0]["toy/tokens"] > 0 and [m["step"] for m in lines if "loss" in m] == [1, 2]

    assert main(["eval", f"run={run_dir}", "sample.num_prompts=2", "sample.max_new_tokens=4"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["method"] == "toy" and "gold/score" in result

    recipe_dir = tmp_path / "recipe"
    assert main(["recipe", "toy", *TINY, f"run.dir={recipe_dir}"]) == 0
    report = (recipe_dir / "report.md").read_text()
    assert "`toy` (toy)" in report and (recipe_dir / "plots" / "toy.png").exists()
