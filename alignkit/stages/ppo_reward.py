"""Where PPO's sequence scores come from: a reward-model run or a built-in task's gold judge.

A reward function takes (rows, completion texts) and returns (B,) scores. An RM run
trained on the same base is loaded as a second adapter ("reward") plus its score
head on the policy's base, so no second copy of the base is in memory; otherwise
(another base, or a full fine-tune RM) it is loaded as its own model.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config.compose import load_saved_config
from ..data.tasks import TASKS
from ..errors import UsageError
from ..eval.reward import load_scorer, score_texts
from ..models.load import base_model_cfg, resolve_model_dir


def as_completion(prompt, text: str):
    """The completion in the prompt's format (a message list for chat prompts)."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def gold_reward(task: str):
    judge = TASKS[task][1]

    def reward(rows: list[dict], texts: list[str]) -> torch.Tensor:
        return torch.tensor([judge(t, r["answer"]) for r, t in zip(rows, texts)])

    return reward


@contextlib.contextmanager
def active_adapter(model, name: str):
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def shared_base_reward(model, tokenizer, rm_dir: Path, max_length: int, batch_size: int):
    """Load the RM's LoRA adapter next to the policy's; score with its head on the same base."""
    final = rm_dir / "final"
    model.load_adapter(str(final), adapter_name="reward", is_trainable=False)
    head_weights = {k.split("score.")[-1]: v for k, v in load_file(final / "adapter_model.safetensors").items()
                    if ".score." in f".{k}"}
    weight = head_weights["weight"]
    score = torch.nn.Linear(weight.shape[1], 1, bias="bias" in head_weights)
    score.load_state_dict(head_weights)
    score.requires_grad_(False)
    score = score.to(next(model.parameters()).device)

    def reward(rows: list[dict], texts: list[str]) -> torch.Tensor:
        prompts = [r["prompt"] for r in rows]
        with active_adapter(model, "reward"):
            return score_texts(model, tokenizer, prompts, [as_completion(p, t) for p, t in zip(prompts, texts)],
                               max_length, batch_size, head=score)

    return reward


def reward_run(cfg, tokenizer):
    """(RM run dir, its config) for reward.run: a finished method=rm run whose tokenizer is the policy's.

    An RM on another base with the same vocabulary is loaded as a second model. One with another
    tokenizer is refused: it learned another model family's text format (special tokens, chat
    template), so it is almost always a wrong reward.run rather than a reward for this policy.
    """
    from transformers import AutoTokenizer

    rm_dir = Path(cfg.reward.run)
    if not (rm_dir / "config.yaml").exists() or not (rm_dir / "final").is_dir():
        raise UsageError(f"reward.run: {rm_dir} is not a finished alignkit run (no final/ or config.yaml)")
    rm_cfg = load_saved_config(rm_dir / "config.yaml")
    if rm_cfg.method.name != "rm":
        raise UsageError(f"reward.run: {rm_dir} is a {rm_cfg.method.name} run, not a reward model (method=rm)")
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_dir / "final", trust_remote_code=rm_cfg.model.trust_remote_code)
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UsageError(f"reward.run: {rm_dir} was trained on {rm_cfg.model.path}, whose tokenizer differs from "
                         f"the policy's ({cfg.model.path}): pass a reward model trained on the policy's base "
                         f"(method=rm model.path={cfg.model.path})")
    return rm_dir, rm_cfg


def make_reward(cfg, model, tokenizer, model_dir: str):
    if cfg.reward.kind == "gold":
        return gold_reward(cfg.data.task)
    rm_dir, rm_cfg = reward_run(cfg, tokenizer)
    same_base = resolve_model_dir(base_model_cfg(rm_cfg).path) == model_dir and rm_cfg.adapter.name in ("lora", "qlora")
    if same_base and hasattr(model, "load_adapter"):
        return shared_base_reward(model, tokenizer, rm_dir, rm_cfg.data.max_length, cfg.sample.batch_size)
    print(f"alignkit: the reward model {rm_dir} was not trained as an adapter on this base "
          f"({rm_cfg.model.path}, adapter={rm_cfg.adapter.name}); loading it as a second model", file=sys.stderr)
    score = load_scorer(rm_dir, batch_size=cfg.sample.batch_size)

    def reward(rows: list[dict], texts: list[str]) -> torch.Tensor:
        prompts = [r["prompt"] for r in rows]
        return score(prompts, [as_completion(p, t) for p, t in zip(prompts, texts)])

    return reward
