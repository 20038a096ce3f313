"""PNG plots for reports (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, title: str, out: Path) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(records: list[dict], keys: list[str], title: str, out: Path) -> Path:
    """One panel per metric over steps; the held-out value (eval/KEY) as a marker at its step."""
    plt = _pyplot()
    keys = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 40 else None)
        held = [(r["step"], r[f"eval/{key}"]) for r in records if f"eval/{key}" in r]
        if held:
            ax.scatter([s for s, _ in held], [v for _, v in held], color="C3", zorder=3, label="held-out")
            ax.legend(fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(plt, fig, title, out)


def plot_policies(rows: list[dict], title: str, out: Path) -> Path:
    """Bars of the gold score of each policy (base, SFT, final ...) and of each one's KL to its reference.

    rows: {"policy": name, "gold": score, "kl": nats or None}.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    names = [r["policy"] for r in rows]
    left.bar(names, [r["gold"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    left.set_ylim(0, 1.15)
    left.set_title("gold score (held-out prompts, greedy)", fontsize=9)
    for i, r in enumerate(rows):
        left.text(i, r["gold"] + 0.02, f"{r['gold']:.2f}", ha="center", fontsize=8)
    with_kl = [r for r in rows if r["kl"] is not None]
    right.bar([r["policy"] for r in with_kl], [r["kl"] for r in with_kl], color="C7")
    right.set_title("KL to its reference (nats / completion)", fontsize=9)
    for ax in (left, right):
        ax.tick_params(labelsize=8)
    return _save(plt, fig, title, out)
