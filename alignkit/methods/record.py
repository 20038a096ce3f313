"""What a method is: one record per method, exported by its own file, read by the registry's users
(`alignkit list`, validation, the runner, eval, plots, recipes, the every-cell test).

A method file keeps its module-level imports light (its schema, checks and record); its functions import
torch and the layers below where they run. So reading the registry to compose and check a config loads
nothing heavy, and a bad override fails in a second, before torch is imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

DATA_KINDS = ("sft", "preference", "unpaired", "prompts")
HEADS = ("lm", "score", "lm+value")


@dataclass(frozen=True)
class Method:
    name: str
    schema: type                   # the method.* dataclass; its values live in configs/method/NAME.yaml
    data: str                      # one of DATA_KINDS: what rows it trains on
    head: str                      # one of HEADS: lm (a policy), score (a reward model), lm+value (policy + value)
    adapters: tuple[str, ...]      # the adapters it runs with
    metrics: tuple[str, ...]       # headline metrics (metrics.jsonl names): final table, plots, recipe report
    prepare: Callable              # (cfg, tokenizer, rows) -> (examples, collate or None); each example has "source"
    step: Callable                 # (model, batch, denominator, method cfg) -> (loss, stats): one (micro)batch
    rollout: Callable | None = None  # online: (ctx, rows) -> batch with "metrics", "samples", "tokens"
    update: Callable | None = None   # online: (ctx, batch, session, real rows) -> stats; its optimizer steps
    reference: Callable = lambda method_cfg: True  # (method cfg) -> whether it uses the reference policy
    reference_values: Callable | None = None  # (model, batch) -> {ref_*: per-example values}: what a precomputed
                                              # reference stores (forward.reference.precompute_reference)
    updates_per_step: Callable = lambda method_cfg: 1  # optimizer updates per step (online: epochs x minibatches)
    strategies: tuple[str, ...] = ("ddp", "fsdp")
    why_not_fsdp: str = ""
    check: Callable | None = None    # (cfg) -> None: the method's own config checks (UsageError)
    check_data: Callable | None = None  # (cfg, train examples) -> None: checks of what it trains on (UsageError),
                                        # before anything is written
    before_training: Callable | None = None  # (run) -> None: e.g. precomputing reference log-probs
    finish: Callable | None = None   # (model, final dir) -> None: extra files in final/
    state: Callable | None = None    # online: (method cfg) -> what it keeps across steps (checkpointed)
    presets: tuple[str, ...] = ()    # other method names that are presets of this one (their YAML sets name)
    preset_of: str | None = None     # set by the registry on a preset's record

    @property
    def online(self) -> bool:
        return self.rollout is not None


@dataclass
class Online:
    """What an online method's rollout and update work with (built by the runner)."""
    cfg: object
    model: object
    tokenizer: object
    device: object
    forward: object          # the method's step as one module (DDP/FSDP-wrapped): forward(minibatch, denominator)
    reward: Callable         # (rows, completion texts, completion ids=None) -> (B,) scores or {name: (B,) scores}
    state: dict              # what the method keeps across steps (the session checkpoints it)
    step: int = 0            # the step under way
    reference: object = None  # a frozen copy of the base as the reference, or None: the model with adapters off
    prompts: list = field(default_factory=list)  # every training prompt (e.g. for extra draws)
