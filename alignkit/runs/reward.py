"""Where an online method's sequence scores come from (reward.*): a reward-model run, a built-in task's gold
judge, or reward functions (scoring/functions.py). A reward model trained as an adapter on the policy's own base is loaded as a second adapter plus its
score head (no second copy of the base); any other is loaded as its own model."""
from __future__ import annotations

import sys
from pathlib import Path

from ..adapters import ADAPTERS
from ..errors import UsageError
from ..models.load import resolve_model_dir
from ..scoring.functions import functions_reward
from ..scoring.gold import gold_reward
from ..scoring.reward_model import score_texts, shared_base_reward, texts_reward
from .read import base_model_cfg, finished_run, head_of, load_run


def reward_run(cfg, tokenizer):
    """(RM run dir, its config) for reward.run: a finished reward-model run whose tokenizer is the policy's.

    An RM on another base with the same vocabulary is loaded as a second model. One with another
    tokenizer is refused: it learned another model family's text format (special tokens, chat
    template), so it is almost always a wrong reward.run rather than a reward for this policy.
    """
    from transformers import AutoTokenizer

    rm_dir, rm_cfg = finished_run(cfg.reward.run, "reward.run")
    if head_of(rm_cfg) != "score":
        raise UsageError(f"reward.run: {rm_dir} is a {rm_cfg.method.name} run, not a reward model (method=rm)")
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_dir / "final", trust_remote_code=rm_cfg.model.trust_remote_code)
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UsageError(f"reward.run: {rm_dir} was trained on {rm_cfg.model.path}, whose tokenizer differs from "
                         f"the policy's ({cfg.model.path}): pass a reward model trained on the policy's base "
                         f"(method=rm model.path={cfg.model.path})")
    return rm_dir, rm_cfg


def load_scorer(run_dir: str | Path, device=None, batch_size: int = 8):
    """score(prompts, completions) -> (N,) rewards of a reward-model run, for strings or chat-message lists."""
    model, tokenizer, cfg = load_run(run_dir, device)
    if head_of(cfg) != "score":
        raise UsageError(f"{run_dir} is a {cfg.method.name} run, not a reward model (method=rm)")

    def score(prompts: list, completions: list):
        return score_texts(model, tokenizer, prompts, completions, cfg.data.max_length, batch_size)

    return score


def make_reward(cfg, model, tokenizer, model_dir: str):
    """(rows, completion texts, completion ids=None) -> (B,) scores, or {function name: (B,) scores} for
    reward=functions, as reward.* says."""
    if cfg.reward.kind.value == "gold":
        return gold_reward(cfg.data.task)
    if cfg.reward.kind.value == "functions":
        return functions_reward(cfg.reward.functions)
    rm_dir, rm_cfg = reward_run(cfg, tokenizer)
    policy = ADAPTERS[cfg.adapter.name]  # a policy whose init moved base weights into its adapter (PiSSA) has
    # another base than the one the reward model's adapter was trained on
    shareable = ADAPTERS[rm_cfg.adapter.name].switchable and policy.switchable and policy.keeps_base(cfg.adapter)
    if shareable and resolve_model_dir(base_model_cfg(rm_cfg).path) == model_dir:
        return shared_base_reward(model, tokenizer, rm_dir / "final", rm_cfg.data.max_length, cfg.sample.batch_size)
    print(f"alignkit: the reward model {rm_dir} was not trained as an adapter on this base "
          f"({rm_cfg.model.path}, adapter={rm_cfg.adapter.name}); loading it as a second model", file=sys.stderr)
    return texts_reward(load_scorer(rm_dir, batch_size=cfg.sample.batch_size))
