"""Structured-config schemas, registered in Hydra's ConfigStore.

Values live in the YAML files under configs/ (so every default is visible
there); these dataclasses only give each key its type, so a typo or a wrong
type is rejected when the config is composed. A method or adapter option's
YAML names its schema in its defaults list (`- base_lora`).
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


class DPOLoss(Enum):
    sigmoid = "sigmoid"
    cdpo = "cdpo"
    ipo = "ipo"
    hinge = "hinge"
    simpo = "simpo"


class DistillLoss(Enum):
    kl = "kl"
    mse = "mse"


# ---- method group -------------------------------------------------------
@dataclass
class SFTMethod:
    name: str = MISSING
    completion_only_loss: bool = MISSING


@dataclass
class DPOMethod:
    name: str = MISSING
    beta: float = MISSING
    loss: DPOLoss = MISSING
    label_smoothing: float = MISSING
    gamma: float = MISSING
    precompute_ref: bool = MISSING


class KLEstimator(Enum):
    k1 = "k1"
    k3 = "k3"


@dataclass
class PPOMethod:
    name: str = MISSING
    kl_coef: float = MISSING
    kl_estimator: KLEstimator = MISSING
    adaptive_kl: bool = MISSING
    target_kl: float = MISSING
    kl_horizon: float = MISSING
    gamma: float = MISSING
    lam: float = MISSING
    whiten_advantages: bool = MISSING
    clip_range: float = MISSING
    vf_clip: float = MISSING
    vf_coef: float = MISSING
    ppo_epochs: int = MISSING
    num_minibatches: int = MISSING
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: int = MISSING
    top_p: float = MISSING
    missing_eos_penalty: Optional[float] = MISSING
    sample_every: int = MISSING


@dataclass
class RewardConfig:
    kind: str = MISSING  # model | gold
    run: Optional[str] = MISSING


@dataclass
class PolicyConfig:
    init: Optional[str] = MISSING


@dataclass
class RMMethod:
    name: str = MISSING
    margin: float = MISSING
    center_coef: float = MISSING


# ---- adapter group ------------------------------------------------------
@dataclass
class LoraAdapter:
    name: str = MISSING
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING  # "all-linear" or a list of module names


@dataclass
class QLoraAdapter(LoraAdapter):
    quant_type: str = MISSING  # nf4 (fp4 also accepted by bitsandbytes)
    double_quant: bool = MISSING
    compute_dtype: Dtype = MISSING


@dataclass
class FullAdapter:
    name: str = MISSING


@dataclass
class BitDeltaAdapter:
    name: str = MISSING
    distill_steps: int = MISSING
    lr: float = MISSING
    distill_loss: DistillLoss = MISSING
    gold_max_new_tokens: int = MISSING
    finetuned: Optional[str] = MISSING  # alignkit compress only: the fine-tuned model


@dataclass
class PromptAdapter:
    name: str = MISSING
    num_virtual_tokens: int = MISSING
    init_text: Optional[str] = MISSING  # text whose token embeddings start the soft prompt; null = random


@dataclass
class PrefixAdapter:
    name: str = MISSING
    num_virtual_tokens: int = MISSING
    prefix_projection: bool = MISSING  # train the prefix through an MLP (reparameterisation)
    projection_hidden_size: int = MISSING


# ---- plain groups -------------------------------------------------------
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


@dataclass
class SampleConfig:
    prompts: Optional[List[str]] = MISSING
    num_prompts: int = MISSING
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: int = MISSING
    top_p: float = MISSING
    batch_size: int = MISSING


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
    run: RunConfig = MISSING
    launcher: Launcher = MISSING
    nproc: int = MISSING


# schema of each method / adapter, by its `name`; YAML options pick theirs as `base_<name>`
SCHEMAS = {
    "method": {"sft": SFTMethod, "dpo": DPOMethod, "rm": RMMethod, "ppo": PPOMethod},
    "adapter": {"lora": LoraAdapter, "qlora": QLoraAdapter, "full": FullAdapter, "prompt": PromptAdapter,
                "prefix": PrefixAdapter, "bitdelta": BitDeltaAdapter},
}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"base_{name}", node=node)
