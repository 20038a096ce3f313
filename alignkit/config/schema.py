"""Structured-config schemas of the sections every run has, registered in Hydra's ConfigStore.

Values live in the YAML files under configs/ (so every default is visible there); these dataclasses
only give each key its type, so a typo or a wrong type is rejected when the config is composed. The
method and adapter groups' schemas live with each method and adapter (their records); `register`
stores them too, under `base_<name>`, which each option's YAML names in its defaults list.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Dtype(Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Precision(Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Optimizer(Enum):
    adamw = "adamw"
    adamw_8bit = "adamw_8bit"
    paged_adamw_8bit = "paged_adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"


class Schedule(Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Strategy(Enum):
    ddp = "ddp"
    fsdp = "fsdp"


class Launcher(Enum):
    none = "none"
    torchrun = "torchrun"


class RewardKind(Enum):
    model = "model"
    gold = "gold"
    functions = "functions"


@dataclass
class RewardConfig:
    kind: RewardKind = MISSING
    run: Optional[str] = MISSING
    functions: List[str] = MISSING          # reward=functions: "pkg.module:fn", "path/file.py:fn" or a built-in name
    weights: Optional[List[float]] = MISSING  # one per function; null = all 1


@dataclass
class PolicyConfig:
    init: Optional[str] = MISSING


@dataclass
class EvalConfig:
    beta: float = MISSING
    kl_temperature: float = MISSING


@dataclass
class ModelConfig:
    path: str = MISSING
    dtype: Dtype = MISSING
    trust_remote_code: bool = MISSING
    allow_pickle: bool = MISSING


@dataclass
class DataConfig:
    path: Optional[str] = MISSING
    task: Optional[str] = MISSING
    task_size: int = MISSING
    limit: Optional[int] = MISSING
    max_length: int = MISSING
    max_prompt_length: Optional[int] = MISSING
    eval_fraction: float = MISSING


@dataclass
class TrainConfig:
    batch_size: int = MISSING
    grad_accum: int = MISSING
    lr: float = MISSING
    epochs: int = MISSING
    max_steps: int = MISSING
    warmup_ratio: float = MISSING
    schedule: Schedule = MISSING
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    seed: int = MISSING
    shuffle: bool = MISSING
    log_every: int = MISSING
    save_every: int = MISSING
    max_bad_steps: int = MISSING
    keep_checkpoints: int = MISSING
    optimizer: Optimizer = MISSING
    precision: Precision = MISSING
    gradient_checkpointing: bool = MISSING
    packing: bool = MISSING
    disable_dropout: bool = MISSING
    eval_batch_size: int = MISSING
    strategy: Strategy = MISSING
    loraplus_lr_ratio: Optional[float] = MISSING  # LoRA+: the B matrices learn this many times faster; null = off


@dataclass
class SamplingConfig:
    """How completions are sampled: the `sample` section, and online methods' sampling keys (method.*)."""
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: int = MISSING
    top_p: float = MISSING
    merge_for_generation: Optional[bool] = MISSING  # null = DoRA only (generation/merge.py)


@dataclass
class SampleConfig(SamplingConfig):
    prompts: Optional[List[str]] = MISSING
    num_prompts: int = MISSING
    batch_size: int = MISSING


class ExportFormat(Enum):
    hf = "hf"
    gguf = "gguf"


class GGUFType(Enum):
    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"


@dataclass
class ExportConfig:
    dir: Optional[str] = MISSING
    dtype: Dtype = MISSING
    format: ExportFormat = MISSING
    gguf_type: GGUFType = MISSING
    overwrite: bool = MISSING
    check_rows: int = MISSING


@dataclass
class RunConfig:
    dir: str = MISSING
    resume: Any = MISSING  # false | true (latest checkpoint in run.dir) | a checkpoint path
    overwrite: bool = MISSING
    tensorboard: bool = MISSING


@dataclass
class Config:
    method: Any = MISSING
    adapter: Any = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    train: TrainConfig = MISSING
    sample: SampleConfig = MISSING
    reward: RewardConfig = MISSING
    policy: PolicyConfig = MISSING
    eval: EvalConfig = MISSING
    run: RunConfig = MISSING
    export: ExportConfig = MISSING
    launcher: Launcher = MISSING
    nproc: int = MISSING


def register(groups: dict[str, dict[str, type]]) -> None:
    """Store the root schema, and each group option's schema as `base_<name>` (groups: the method and
    adapter records' schemas, by option name)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schemas in groups.items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"base_{name}", node=node)
