"""The compression report: sizes (artifact vs an fp16 delta) and fidelity, as JSON and a rich table."""
from __future__ import annotations

from pathlib import Path

from .artifact import artifact_bytes
from .compress import Delta

SHOWN_EXTRAS = 3  # the largest changed tensors named in the table; compress.json lists them all
MODELS = ("base", "initial", "distilled", "finetuned")
TITLES = {"base": "base (no delta)", "initial": "BitDelta, α = mean|Δ|", "distilled": "BitDelta, distilled α",
          "finetuned": "fine-tuned"}


def size_report(artifact_dir: Path, delta: Delta) -> dict:
    """Bytes of the artifact vs the same delta in fp16, overall and for the one-bit part alone."""
    linear_params = sum(_numel(shape) for shape in delta.shapes.values())
    one_bit = sum(s.numel() for s in delta.signs.values()) + 4 * len(delta.scales)
    extras = [{"name": n, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
               "bytes": v.numel() * v.element_size()} for n, v in delta.extras.items()]
    extra_params = sum(v.numel() for v in delta.extras.values())
    fp16_delta = 2 * (linear_params + extra_params)
    total = artifact_bytes(artifact_dir)
    return {
        "artifact_bytes": total,
        "fp16_delta_bytes": fp16_delta,
        "ratio": fp16_delta / total,
        "linears": len(delta.signs),
        "linear_params": linear_params,
        "one_bit_bytes": one_bit,
        "one_bit_ratio": 2 * linear_params / one_bit if one_bit else None,
        "extra_params": extra_params,
        "extra_bytes": sum(e["bytes"] for e in extras),
        "extras": extras,
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def summary_metrics(report: dict) -> dict:
    """Flat `bitdelta/...` numbers for summary.json."""
    out = {"bitdelta/size_ratio": report["size"]["ratio"], "bitdelta/artifact_bytes": report["size"]["artifact_bytes"]}
    for model in ("initial", "distilled"):
        for key, value in report["fidelity"][model].items():
            if key != "tokens" and value is not None:
                out[f"bitdelta/{key}_{model}"] = value
    return out


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    size = report["size"]
    sizes = Table(title=f"BitDelta: {report['finetuned_model']} over {report['base_model']}")
    sizes.add_column("what")
    sizes.add_column("size", justify="right")
    sizes.add_column("vs fp16 delta", justify="right")
    sizes.add_row(f"artifact ({report['artifact']})", _mb(size["artifact_bytes"]), f"{size['ratio']:.1f}x smaller")
    sizes.add_row(f"  1-bit signs + scales, {size['linears']} block linears", _mb(size["one_bit_bytes"]),
                  f"{size['one_bit_ratio']:.1f}x smaller" if size["one_bit_ratio"] else "-")
    extras = sorted(size["extras"], key=lambda e: -e["bytes"])
    for extra in extras[:SHOWN_EXTRAS]:
        sizes.add_row(f"  full precision: {extra['name']} {extra['shape']} {extra['dtype']}", _mb(extra["bytes"]),
                      "kept whole")
    if len(extras) > SHOWN_EXTRAS:
        rest = extras[SHOWN_EXTRAS:]
        sizes.add_row(f"  full precision: {len(rest)} more changed tensors (see compress.json)",
                      _mb(sum(e["bytes"] for e in rest)), "kept whole")
    sizes.add_row("fp16 delta (every changed tensor)", _mb(size["fp16_delta_bytes"]), "1.0x")
    fid = report["fidelity"]
    table = Table(title=f"fidelity on {fid['text']} ({fid['base']['tokens']} tokens; gold: {fid['gold_rows']} "
                        f"prompts of {fid['task'] or '-'})")
    for column in ("model", "KL(fine-tuned || model)/token", "next-token agreement", "gold score",
                   "gold vs fine-tuned"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model in MODELS:
        row = fid[model]
        gold = "-" if row.get("gold") is None else f"{row['gold']:.3f}"
        kept = "-" if row.get("gold_vs_finetuned") is None else f"{row['gold_vs_finetuned']:.0%}"
        table.add_row(TITLES[model], f"{row['kl']:.4g}", f"{row['agreement']:.2%}", gold, kept)
    console = Console()
    console.print(sizes)
    console.print(table)
    d = report["distill"]
    if d["steps"]:
        console.print(f"scale distillation: {d['steps']} steps, {d['loss']} loss {d['loss_first']:.4g} -> "
                      f"{d['loss_last']:.4g}, {d['seconds']:.1f} s")
