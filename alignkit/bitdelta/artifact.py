"""The BitDelta artifact on disk: bitdelta.safetensors + bitdelta.json (no pickles).

bitdelta.safetensors holds, per compressed linear (module name M), `signs.M` (uint8, the packed
sign bits, see pack.py) and `scale.M` (fp32 scalar); per other changed parameter (name P) `extra.P`
at the fine-tuned model's precision. bitdelta.json is the manifest: format/version, the base
model (path and sha256 of its weights), the sign convention, each linear's shape, each extra's
shape and dtype.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UsageError
from .compress import Delta

FORMAT = "alignkit-bitdelta"
VERSION = 1
TENSORS, MANIFEST = "bitdelta.safetensors", "bitdelta.json"
SIGN_CONVENTION = ("bit 1: delta > 0 -> +1, bit 0: delta <= 0 -> -1; row-major, element 8j+i = bit i "
                   "(least significant first) of byte j, last byte zero-padded")


def save_artifact(out_dir: Path, delta: Delta, info: dict) -> dict:
    """Write the two files into out_dir; info (base model, fingerprint, ...) goes into the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, packed in delta.signs.items():
        tensors[f"signs.{name}"] = packed.contiguous()
        tensors[f"scale.{name}"] = delta.scales[name].detach().float().reshape(()).cpu()
    for name, value in delta.extras.items():
        tensors[f"extra.{name}"] = value.detach().contiguous().cpu()
    save_file(tensors, out_dir / TENSORS, metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **info,
        "sign_convention": SIGN_CONVENTION,
        "linears": {name: list(shape) for name, shape in delta.shapes.items()},
        "extras": {name: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                   for name, v in delta.extras.items()},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def load_artifact(path) -> tuple[Delta, dict]:
    """Read an artifact dir (a run's final/ or the run dir itself) -> (Delta on CPU, manifest)."""
    path = Path(path).expanduser()
    if (path / "final" / MANIFEST).exists():
        path = path / "final"
    if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
        raise UsageError(f"{path}: not a BitDelta artifact (no {MANIFEST} + {TENSORS})")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UsageError(f"{path}: unsupported artifact format {manifest.get('format')} "
                         f"version {manifest.get('version')} (this alignkit reads {FORMAT} {VERSION})")
    try:
        tensors = load_file(path / TENSORS)
    except SafetensorError as exc:
        raise UsageError(f"{path / TENSORS}: unreadable ({exc})") from exc
    delta = Delta()
    for name, shape in manifest["linears"].items():
        delta.signs[name] = tensors[f"signs.{name}"]
        delta.scales[name] = tensors[f"scale.{name}"]
        delta.shapes[name] = tuple(shape)
    delta.extras = {name: tensors[f"extra.{name}"] for name in manifest["extras"]}
    return delta, manifest


def artifact_bytes(path: Path) -> int:
    """Bytes on disk of the artifact proper (tensors + manifest; the tokenizer files not counted)."""
    return (Path(path) / TENSORS).stat().st_size + (Path(path) / MANIFEST).stat().st_size

