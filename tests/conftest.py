"""Shared fixtures: a per-session model cache (the tiny model is built once), config helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_CACHE = tempfile.mkdtemp(prefix="alignkit-test-cache-")
os.environ.setdefault("ALIGNKIT_CACHE", _CACHE)
# one intra-op thread, here and in CLI subprocesses: the tiny model's ops are too small to split, and on
# busy shared cores two threads waiting on each other made each forward ~100x slower
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (real model, TRL)")


def pytest_collection_modifyitems(config, items):
    import torch

    no_gpu = pytest.mark.skip(reason="gpu: needs CUDA (scripts/gpu_check.sh runs these on a GPU machine)")
    slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        elif "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(slow)


def compose(*overrides: str):
    from alignkit.methods import compose as compose_config, validate

    cfg = compose_config(list(overrides))
    validate(cfg)
    return cfg


def patch_method(monkeypatch, name: str, **changes):
    """Replace fields of a registered method's record for one test (e.g. its step)."""
    from dataclasses import replace

    from alignkit.methods import METHODS

    monkeypatch.setitem(METHODS, name, replace(METHODS[name], **changes))
    return METHODS[name]


TINY = ("model=tiny", "data.task_size=24", "train.batch_size=2", "train.max_steps=2", "train.lr=1e-2",
        "train.warmup_ratio=0", "data.max_length=160", "train.eval_batch_size=4")


def tiny_cfg(tmp_path: Path, *overrides: str):
    return compose(*TINY, f"run.dir={tmp_path / 'run'}", *overrides)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from alignkit.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


EXE = Path(sys.executable).parent / "alignkit"
CMD = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "alignkit"]


def alignkit(*args, cwd=None):
    """The CLI in a subprocess, exactly as a user types it (PYTHONPATH picks the checkout under test)."""
    return subprocess.run([*CMD, *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def hf_generate(model, ids, attn, s, **options):
    """transformers' generate on left-padded prompts with the decoder's settings (generation.decode.Sampling):
    the reference the decoder is checked against. Returns (new tokens (B, n), generate's output)."""
    from transformers import GenerationConfig

    from alignkit.forward.virtual import virtual_token_inputs

    sampled = s.temperature > 0
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=sampled,
                           temperature=s.temperature if sampled else None, top_k=s.top_k if sampled else None,
                           top_p=s.top_p if sampled else None, pad_token_id=s.pad, eos_token_id=list(s.eos) or None,
                           use_cache=True, return_dict_in_generate=True, **options)
    module, inputs, _ = virtual_token_inputs(model, ids, attn)
    with torch_no_grad():
        out = module.generate(**inputs, generation_config=gen)
    return (out.sequences[:, ids.shape[1]:] if "input_ids" in inputs else out.sequences), out  # embeds: new only


def torch_no_grad():
    import torch

    return torch.no_grad()
