"""Every shipped YAML composes, validates and leaves no value unset; the validity table is enforced."""
import pytest
from omegaconf import OmegaConf

from alignkit.adapters import ADAPTERS
from alignkit.config.compose import group_options
from alignkit.methods import METHODS, compose as compose_config, validate
from alignkit.errors import UsageError

# options that need a value only the user has
REQUIRED = {("data", "file"): ["data.path=rows.jsonl"], ("method", "ppo"): ["reward=gold"],
            ("method", "grpo"): ["reward=gold"], ("method", "rloo"): ["reward=gold"]}
# what a method needs besides its own YAML
METHOD_NEEDS = {"ppo": ["reward=gold"], "grpo": ["reward=gold"], "rloo": ["reward=gold"]}


def every_option():
    return [(g, o) for g, options in group_options().items() for o in options]


def test_groups_are_found():
    groups = group_options()
    assert {"method", "adapter", "model", "data"} <= set(groups)
    assert {"sft", "dpo"} <= set(groups["method"]) and {"lora", "qlora", "full"} <= set(groups["adapter"])


@pytest.mark.parametrize("group,option", every_option())
def test_every_yaml_composes_and_validates(group, option):
    overrides = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    if group == "adapter":
        preset_of = {p: a.name for a in ADAPTERS.values() for p in a.presets}
        method = next(m for m, record in METHODS.items() if preset_of.get(option, option) in record.adapters)
        overrides += [f"method={method}", *METHOD_NEEDS.get(method, [])]
    cfg = compose_config(overrides)
    assert OmegaConf.missing_keys(cfg) == set()
    validate(cfg)


@pytest.mark.parametrize("method,adapter", [(m, a) for m in METHODS for a in ADAPTERS])
def test_every_cell_of_the_table_validates_or_is_refused(method, adapter):
    cfg_overrides = [f"method={method}", f"adapter={adapter}", *METHOD_NEEDS.get(method, [])]
    if adapter in METHODS[method].adapters:
        validate(compose_config(cfg_overrides))
    else:
        with pytest.raises(UsageError, match="does not run with"):
            validate(compose_config(cfg_overrides))


def test_invalid_combination_is_a_usage_error():
    cfg = compose_config(["method=rm", "adapter=bitdelta"])
    with pytest.raises(UsageError, match="method=rm does not run with adapter=bitdelta"):
        validate(cfg)


@pytest.mark.parametrize("override,message", [
    ("method.beta=0", "method.beta=0.0 is out of range"),
    ("train.lr=-1", "train.lr=-1.0 is out of range"),
    ("adapter.r=0", "adapter.r=0 is out of range"),
    ("data.eval_fraction=1.5", "data.eval_fraction=1.5 is out of range"),
])
def test_out_of_range_values(override, message):
    with pytest.raises(UsageError, match=message):
        validate(compose_config(["method=dpo", override]))


def test_typo_and_wrong_type_are_rejected_when_composing():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config(["method=dpo", "method.betta=1"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["train.batch_size=many"])


def test_a_run_saved_before_newer_keys_existed_still_loads(tmp_path):
    """config.yaml of an older run lacks keys added since (model.allow_pickle, run.overwrite, ...)."""
    from alignkit.methods import saved_config as load_saved_config

    old = OmegaConf.to_container(compose_config(["method=dpo", "model=tiny"]), enum_to_str=True)
    del old["model"]["allow_pickle"], old["train"]["max_bad_steps"], old["run"]["overwrite"]
    del old["adapter"]["use_dora"], old["adapter"]["init"], old["train"]["loraplus_lr_ratio"], old["export"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    cfg = load_saved_config(tmp_path / "config.yaml")
    assert cfg.model.allow_pickle is False and cfg.train.max_bad_steps == 5 and cfg.run.overwrite is False
    assert cfg.method.beta == 0.1
    assert cfg.adapter.use_dora is False and cfg.adapter.init == "default" and cfg.train.loraplus_lr_ratio is None
    assert cfg.export.format.value == "hf"
