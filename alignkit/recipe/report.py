"""RECIPE_DIR/report.md and RECIPE_DIR/plots/*.png: what each stage did and what the policies learned."""
from __future__ import annotations

import json
from pathlib import Path

from ..eval.plots import plot_curves, plot_policies
from ..methods import method_record
from ..session.logs import read_log


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(value) -> str:
    """A markdown table cell: numbers formatted, a chat prompt as its last message, no pipes or line breaks."""
    if isinstance(value, list):
        value = value[-1]["content"] if value else ""
    text = value if isinstance(value, str) else _fmt(value)
    return text.replace("|", "\\|").replace("\n", "<br>").strip() or "(empty)"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def policy_rows(stages, evals: dict) -> list[dict]:
    """Each evaluated policy with its gold score, win-rate and KL against its reference; the base first
    when the first policy started from it (its reference is then the base model)."""
    rows = []
    for stage in stages:
        result = evals.get(stage.name)
        if result is None or "gold/score" not in result:
            continue
        reference = stage.inputs.get("policy.init", "base")
        if not rows and reference == "base" and "gold/score_ref" in result:
            rows.append({"policy": "base", "gold": result["gold/score_ref"], "win": None, "kl": None,
                         "reference": "-"})
        rows.append({"policy": stage.name, "gold": result["gold/score"], "win": result.get("gold/win_rate"),
                     "kl": result.get("kl_to_ref"), "reference": reference})
    return rows


def sample_columns(stages, evals: dict, root: Path) -> tuple[list[str], list[list]]:
    """Greedy completions on the same held-out prompts, one column per policy (the base first)."""
    header, columns, prompts = ["prompt"], [], None
    for stage in stages:
        if stage.name not in evals or not (root / stage.name / "eval.json").exists():
            continue
        samples = json.loads((root / stage.name / "eval.json").read_text()).get("samples", [])[:4]
        if not samples or (prompts is not None and [s["prompt"] for s in samples] != prompts):
            continue
        if prompts is None and "completion_ref" in samples[0] and "policy.init" not in stage.inputs:
            header.append("base")
            columns.append([s["completion_ref"] for s in samples])
        prompts = [s["prompt"] for s in samples]
        header.append(stage.name)
        columns.append([s["completion"] for s in samples])
    return header, [[p, *col] for p, *col in zip(prompts or [], *columns)]


def stage_table(stages, states: dict, summaries: dict) -> list[str]:
    rows = []
    for stage in stages:
        s, keys = summaries[stage.name], method_record(stage.cfg.method.name).metrics
        shown = [k for k in keys if k != "loss" and k in s][:2]
        rows.append([stage.name, stage.cfg.method.name, states[stage.name], s.get("step"), s.get("loss"),
                     ", ".join(f"{k} {_fmt(s[k])}" for k in shown) or "-", s.get("eval/loss"),
                     round(s.get("wall_seconds", 0.0), 1)])
    return _table(["stage", "method", "this run", "steps", "final loss", "final metrics", "held-out loss",
                   "wall s"], rows)


def headline(stage, summary: dict) -> list[str]:
    """One line per stage: its method's first headline metric on held-out rows and at the last step, or, for
    an online method, over its first and last steps (the rollouts it learned from)."""
    record = method_record(stage.cfg.method.name)
    key = next((k for k in record.metrics if k != "loss"), "loss")
    if record.online:
        values = [r[key] for r in read_log(Path(stage.cfg.run.dir) / "metrics.jsonl") if key in r]
        if not values:
            return []
        k = max(1, min(3, len(values) // 2))
        return [f"`{stage.name}` ({record.name}): `{key}` {_fmt(sum(values[:k]) / k)} over the first {k} steps, "
                f"{_fmt(sum(values[-k:]) / k)} over the last {k}.", ""]
    if f"eval/{key}" not in summary:
        return []
    return [f"`{stage.name}` ({record.name}): held-out `{key}` {_fmt(summary.get(f'eval/{key}'))} (last training "
            f"step: {_fmt(summary.get(key))}).", ""]


def write_report(name: str, args: list[str], root: Path, stages, states: dict, summaries: dict, evals: dict,
                 wall: float) -> Path:
    plots = root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    chain = " -> ".join(s.name for s in stages)
    lines = [f"# Recipe `{name}`: {chain}", "",
             f"`alignkit recipe {' '.join([name, *args])}` in `{root}`; this invocation took {wall:.0f} s "
             f"(stages marked `done` ran before and were skipped). Model `{stages[0].cfg.model.path}`, "
             f"adapter `{stages[0].cfg.adapter.name}`, data `{stages[0].cfg.data.task or stages[0].cfg.data.path}`.",
             "", "## Stages", "", *stage_table(stages, states, summaries), ""]
    for stage in stages:
        lines += headline(stage, summaries[stage.name])
    policies = policy_rows(stages, evals)
    if policies:
        n = next(iter(evals.values())).get("rows")
        lines += ["## Policies on held-out prompts", "",
                  f"Gold score: the task's gold judge on greedy completions of "
                  f"{min(stages[0].cfg.sample.num_prompts, n)} held-out prompts. Win-rate: against the "
                  f"policy's reference on the same prompts (tie = 1/2). KL: KL(policy || reference) in nats per "
                  f"completion, sampled at temperature 1.", "",
                  *_table(["policy", "reference", "gold score", "win-rate vs reference", "KL to reference"],
                          [[r["policy"], r["reference"], r["gold"], r["win"], r["kl"]] for r in policies]), ""]
        plot_policies(policies, f"recipe {name}", plots / "policies.png")
        lines += ["![policies](plots/policies.png)", ""]
    lines += ["## Training curves", ""]
    for stage in stages:
        records = read_log(Path(stage.cfg.run.dir) / "metrics.jsonl")
        keys = list(method_record(stage.cfg.method.name).metrics)
        plot_curves(records, keys, f"{stage.name} ({stage.cfg.method.name})", plots / f"{stage.name}.png")
        lines += [f"![{stage.name}](plots/{stage.name}.png)", ""]
    header, rows = sample_columns(stages, evals, root)
    if rows:
        lines += ["## Samples (greedy, held-out prompts)", "", *_table(header, rows), ""]
    (root / "report.md").write_text("\n".join(lines))
    return root / "report.md"
