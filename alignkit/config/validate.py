"""Range checks on the sections every run has (types are already checked by the schema). The method's and the
adapter's own checks live in their records (alignkit.methods.validate runs them all)."""
from __future__ import annotations

from omegaconf import DictConfig

from ..errors import UsageError, require


def validate_common(cfg: DictConfig) -> None:
    d, t, s = cfg.data, cfg.train, cfg.sample
    if d.path is None and d.task is None:
        raise UsageError("no data: set data.path (a file or hub dataset id) or data.task (a built-in task)")
    require(d.max_length >= 2, "data.max_length", d.max_length, "must be >= 2")
    if d.max_prompt_length is not None:
        require(0 < d.max_prompt_length < d.max_length, "data.max_prompt_length", d.max_prompt_length,
                "must be > 0 and < data.max_length")
    if d.limit is not None:
        require(d.limit >= 1, "data.limit", d.limit, "must be >= 1 (or null for all rows)")
    require(d.task_size >= 1, "data.task_size", d.task_size, "must be >= 1")
    require(0 <= d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
    for key in ("batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_checkpoints"):
        require(t[key] >= 1, f"train.{key}", t[key], "must be >= 1")
    require(t.lr >= 0, "train.lr", t.lr, "must be >= 0")
    require(t.epochs >= 1 or t.max_steps >= 1, "train.epochs", t.epochs, "need train.epochs >= 1 or train.max_steps >= 1")
    require(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
    require(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "must be >= 0 (0 = no clipping)")
    require(t.save_every >= 0, "train.save_every", t.save_every, "must be >= 0 (0 = only final)")
    require(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "must be >= 1")
    if t.loraplus_lr_ratio is not None:
        require(t.loraplus_lr_ratio > 0, "train.loraplus_lr_ratio", t.loraplus_lr_ratio, "must be > 0 (or null: off)")
    validate_sampling(s, "sample")
    require(s.batch_size >= 1 and s.num_prompts >= 1, "sample.batch_size/num_prompts",
            f"{s.batch_size}/{s.num_prompts}", "must be >= 1")
    require(cfg.eval.beta > 0, "eval.beta", cfg.eval.beta, "must be > 0")
    require(cfg.eval.kl_temperature > 0, "eval.kl_temperature", cfg.eval.kl_temperature, "must be > 0")
    require(cfg.nproc >= 1, "nproc", cfg.nproc, "must be >= 1")
    if t.strategy.value == "fsdp" and t.precision.value == "fp16":
        raise UsageError("train.precision=fp16 does not run with train.strategy=fsdp (the fp16 gradient scaler "
                         "would decide on each process's own shard): use train.precision=bf16")
    if cfg.run.overwrite and cfg.run.resume is not False:
        raise UsageError("run.overwrite=true replaces a run, run.resume continues it: set only one of them")


def validate_sampling(section, prefix: str, greedy: bool = True) -> None:
    """The sampling keys (SamplingConfig) of `sample` or of an online method. greedy: temperature 0 allowed."""
    require(section.max_new_tokens >= 1, f"{prefix}.max_new_tokens", section.max_new_tokens, "must be >= 1")
    if greedy:
        require(section.temperature >= 0, f"{prefix}.temperature", section.temperature, "must be >= 0 (0 = greedy)")
    else:
        require(section.temperature > 0, f"{prefix}.temperature", section.temperature, "must be > 0")
    require(section.top_k >= 0, f"{prefix}.top_k", section.top_k, "must be >= 0 (0 = off)")
    require(0 < section.top_p <= 1, f"{prefix}.top_p", section.top_p, "must be in (0, 1]")
