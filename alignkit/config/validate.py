"""Range checks on a composed config (types are already checked by the schema)."""
from __future__ import annotations

from omegaconf import DictConfig

from ..errors import UsageError
from .rules import check_combination


def _require(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise UsageError(f"{key}={value} is out of range: {rule}")


def validate(cfg: DictConfig, verb: str = "train") -> None:
    check_combination(cfg.method.name, cfg.adapter.name)
    m, a, d, t = cfg.method, cfg.adapter, cfg.data, cfg.train
    if m.name == "dpo":
        _require(m.beta > 0, "method.beta", m.beta, "must be > 0")
        _require(0 <= m.label_smoothing < 0.5, "method.label_smoothing", m.label_smoothing, "must be in [0, 0.5)")
        if m.loss.value == "simpo" and m.precompute_ref:
            raise UsageError("method.loss=simpo uses no reference model: drop method.precompute_ref=true")
        if m.loss.value == "cdpo":
            _require(m.label_smoothing > 0, "method.label_smoothing", m.label_smoothing,
                     "method.loss=cdpo needs a label_smoothing > 0 (e.g. 0.1)")
    if m.name == "ppo":
        if cfg.reward.kind == "model" and cfg.reward.run is None:
            raise UsageError("method=ppo needs a reward: reward.run=RM_RUN_DIR (a method=rm run) or reward=gold")
        if cfg.reward.kind == "gold" and cfg.data.task is None:
            raise UsageError("reward=gold needs a built-in task (data.task=...) whose gold judge scores completions")
        for key in ("kl_coef", "clip_range", "vf_clip", "vf_coef", "target_kl", "kl_horizon"):
            _require(m[key] >= 0 if key == "kl_coef" else m[key] > 0, f"method.{key}", m[key], "must be > 0")
        _require(0 <= m.gamma <= 1 and 0 <= m.lam <= 1, "method.gamma/lam", f"{m.gamma}/{m.lam}", "must be in [0, 1]")
        _require(m.temperature > 0, "method.temperature", m.temperature, "must be > 0")
        for key in ("ppo_epochs", "num_minibatches", "max_new_tokens", "sample_every"):
            _require(m[key] >= 1, f"method.{key}", m[key], "must be >= 1")
        _require(m.num_minibatches <= t.batch_size, "method.num_minibatches", m.num_minibatches,
                 f"must be <= train.batch_size={t.batch_size} (rollouts per step)")
    if m.name == "rm":
        _require(m.center_coef >= 0, "method.center_coef", m.center_coef, "must be >= 0")
    if a.name in ("lora", "qlora"):
        _require(a.r >= 1, "adapter.r", a.r, "must be >= 1")
        _require(a.alpha > 0, "adapter.alpha", a.alpha, "must be > 0")
        _require(0 <= a.dropout < 1, "adapter.dropout", a.dropout, "must be in [0, 1)")
    if a.name == "bitdelta":
        _validate_bitdelta(cfg, verb)
    if a.name in ("prompt", "prefix"):
        _require(a.num_virtual_tokens >= 1, "adapter.num_virtual_tokens", a.num_virtual_tokens, "must be >= 1")
    if a.name == "prompt" and a.init_text is not None:
        _require(a.init_text.strip() != "", "adapter.init_text", repr(a.init_text), "must be text, or null for random")
    if a.name == "prefix":
        _require(a.projection_hidden_size >= 1, "adapter.projection_hidden_size", a.projection_hidden_size,
                 "must be >= 1")
        if t.gradient_checkpointing:
            raise UsageError("adapter=prefix does not work with train.gradient_checkpointing=true (the prefix lives "
                             "in the attention cache, which checkpointing recomputes without it): set it to false")
    if d.path is None and d.task is None:
        raise UsageError("no data: set data.path (a file or hub dataset id) or data.task (a built-in task)")
    _require(d.max_length >= 2, "data.max_length", d.max_length, "must be >= 2")
    if d.max_prompt_length is not None:
        _require(0 < d.max_prompt_length < d.max_length, "data.max_prompt_length", d.max_prompt_length,
                 "must be > 0 and < data.max_length")
    if d.limit is not None:
        _require(d.limit >= 1, "data.limit", d.limit, "must be >= 1 (or null for all rows)")
    _require(d.task_size >= 1, "data.task_size", d.task_size, "must be >= 1")
    _require(0 <= d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
    for key in ("batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_checkpoints"):
        _require(t[key] >= 1, f"train.{key}", t[key], "must be >= 1")
    _require(t.lr >= 0, "train.lr", t.lr, "must be >= 0")
    _require(t.epochs >= 1 or t.max_steps >= 1, "train.epochs", t.epochs, "need train.epochs >= 1 or train.max_steps >= 1")
    _require(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
    _require(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "must be >= 0 (0 = no clipping)")
    s = cfg.sample
    _require(s.max_new_tokens >= 1, "sample.max_new_tokens", s.max_new_tokens, "must be >= 1")
    _require(s.temperature >= 0, "sample.temperature", s.temperature, "must be >= 0 (0 = greedy)")
    _require(0 < s.top_p <= 1, "sample.top_p", s.top_p, "must be in (0, 1]")
    _require(s.batch_size >= 1 and s.num_prompts >= 1, "sample.batch_size/num_prompts",
             f"{s.batch_size}/{s.num_prompts}", "must be >= 1")
    _require(t.save_every >= 0, "train.save_every", t.save_every, "must be >= 0 (0 = only final)")
    _require(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "must be >= 1")
    _validate_processes(cfg)
    if cfg.run.overwrite and cfg.run.resume is not False:
        raise UsageError("run.overwrite=true replaces a run, run.resume continues it: set only one of them")


def _validate_bitdelta(cfg: DictConfig, verb: str) -> None:
    a = cfg.adapter
    _require(a.distill_steps >= 0, "adapter.distill_steps", a.distill_steps, "must be >= 0 (0 = no distillation)")
    _require(a.lr >= 0, "adapter.lr", a.lr, "must be >= 0")
    _require(a.gold_max_new_tokens >= 1, "adapter.gold_max_new_tokens", a.gold_max_new_tokens, "must be >= 1")
    if verb == "compress":
        if a.finetuned is None:
            raise UsageError("compress needs finetuned=PATH (the fine-tuned model) and base=PATH (its base)")
        if cfg.run.resume is not False:
            raise UsageError("alignkit compress does not resume: leave run.resume=false")
    elif a.finetuned is not None:
        raise UsageError("adapter.finetuned is for alignkit compress; alignkit train compresses the model it trains")


def _validate_processes(cfg: DictConfig) -> None:
    """launcher/nproc and the combinations train.strategy=fsdp cannot run."""
    _require(cfg.nproc >= 1, "nproc", cfg.nproc, "must be >= 1")
    if cfg.train.strategy.value != "fsdp":
        return
    if cfg.train.precision.value == "fp16":
        raise UsageError("train.precision=fp16 does not run with train.strategy=fsdp (the fp16 gradient scaler "
                         "would decide on each process's own shard): use train.precision=bf16")
    if cfg.method.name == "ppo":
        raise UsageError("method=ppo does not run with train.strategy=fsdp (rollouts generate on each process "
                         "alone, which sharded weights do not allow): use train.strategy=ddp")
    if cfg.adapter.name == "bitdelta":
        raise UsageError("adapter=bitdelta does not run with train.strategy=fsdp (the 1-bit compression after "
                         "training needs the whole model in one process): use train.strategy=ddp")
    if cfg.adapter.name in ("prompt", "prefix"):
        raise UsageError(f"adapter={cfg.adapter.name} does not run with train.strategy=fsdp (peft saves it by running "
                         f"its prompt encoder outside the sharded forward): use train.strategy=ddp, which also "
                         f"fits: its few trainable weights need no sharding")
