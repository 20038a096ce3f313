"""`alignkit VERB [overrides]`: compose the config with Hydra, then run the verb."""
from __future__ import annotations

import os
import shlex
import sys

from .errors import Interrupted, UsageError, io_error

USAGE = """\
usage: alignkit VERB [-m] [--cfg] [overrides ...]

verbs:
  train     run one method: method=sft|rm|dpo (ipo, simpo)|kto|orpo|ppo|grpo|rloo (alignkit list)
            adapter=lora|qlora|dora|pissa|vera|loha|lokr|ia3|full|prompt|prefix|bitdelta model=... data=...
  eval      evaluate a run (run=RUN_DIR) or a model (model.path=...): RM accuracy and margin; a policy's
            own method's metrics (KTO, ORPO, the DPO family; else DPO metrics vs its reference) and the
            gold score of greedy generations; writes eval.json
  generate  sample completions from a run or model: sample.prompts='[...]' or held-out prompts
  export    run=RUN_DIR: the run as a plain model with its adapter merged into the weights (no inference
            latency): export.dir (default RUN/export), export.dtype=auto|float32|bfloat16|float16,
            export.format=hf|gguf, export.gguf_type=f32|f16|q8_0; a report in export.json
  compress  BitDelta: base=PATH finetuned=PATH -> a 1-bit delta in RUN/final, report in RUN/compress.json
  recipe    NAME: run a multi-stage recipe (dpo: SFT -> DPO; kto: SFT -> KTO; orpo: ORPO alone;
            rlhf: SFT -> RM -> PPO; grpo: SFT -> GRPO) into run.dir, one run dir per stage, then report.md + plots/;
            re-run the same command to resume
  list      show config groups, their options, the valid method x adapter pairs and the recipes

options:
  -m, --multirun   sweep: every combination of comma-separated values runs as one job
                   (alignkit train -m method.beta=0.1,0.5); job i writes to RUN_DIR/i
  --cfg            print the composed config and exit without running
  -h, --help       this help

overrides use Hydra's grammar: group=option (adapter=qlora), key=value
(method.beta=0.2 train.max_steps=50), +key=value to add, ~key to delete.

examples:
  alignkit train method=dpo adapter=qlora            # DPO on the embedded SmolLM2-135M
  alignkit train method=sft model=tiny train.max_steps=5
  alignkit train method=dpo data.path=prefs.jsonl method.beta=0.2
  alignkit train -m method=dpo method.beta=0.1,0.5 model=tiny
  alignkit train method=dpo launcher=torchrun nproc=4  # 4 processes (GPUs); or: torchrun ... -m alignkit train
  alignkit eval run=runs/dpo-lora-20261125-101500
  alignkit generate run=runs/dpo-lora-20261125-101500 sample.prompts='[What is 7 * 6?]'
  alignkit export run=runs/dpo-lora-20261125-101500 export.dtype=bfloat16
  alignkit export run=runs/sft-lora-20261125-101500 export.format=gguf export.gguf_type=q8_0
  alignkit compress base=alignkit:smollm2-135m-instruct finetuned=runs/sft-full-X/final
  alignkit recipe dpo run.dir=runs/tone sft.train.lr=2e-4 dpo.method.beta=0.2 train.seed=1
  alignkit recipe rlhf model=tiny train.max_steps=3     # shared keys apply to every stage
  alignkit list

exit codes: 0 done; 2 bad input (one line on stderr); 130 Ctrl-C (a checkpoint is saved and the
command that resumes it, ending in run.resume=true, is printed).

environment: ALIGNKIT_CACHE (model cache, default ~/.cache/alignkit),
ALIGNKIT_DEBUG=1 (show tracebacks instead of one-line errors).
"""


def _one_line(exc: BaseException) -> str:
    """Condense a Hydra/OmegaConf error (often several lines plus a cause) into one line."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.options is not None:
        first = str(exc).strip().splitlines()[0]
        options = [o for o in exc.options if not o.startswith("base_")]
        return f"{first.split(': ', 1)[-1]} (available: {', '.join(options)})"
    parts = []
    while exc is not None:
        for line in str(exc).strip().splitlines():
            line = line.strip()
            if line and not line.startswith(("To append", "full_key", "object_type", "reference_type",
                                              "Config search path", "provider", "path=")):
                if line not in parts:
                    parts.append(line)
                break
        exc = exc.__cause__
    return " ".join(parts) or "invalid configuration"


def _list() -> int:
    from rich.console import Console
    from rich.table import Table

    from .adapters import ADAPTERS
    from .config.compose import group_options
    from .methods import METHODS, compose
    from .recipe.plan import load_recipe, recipe_names

    console = Console()
    groups = Table(title="config groups (choose with GROUP=OPTION)")
    groups.add_column("group")
    groups.add_column("options")
    for group, options in group_options().items():
        groups.add_row(group, ", ".join(options))
    console.print(groups)
    methods = Table(title="methods")
    for column in ("method", "data", "model", "reference", "loop", "headline metrics"):
        methods.add_column(column)
    for m in METHODS.values():
        defaults = compose([f"method={m.name}"]).method  # its YAML's values (simpo: no reference)
        methods.add_row(m.name, m.data, m.head, "adapters off" if m.reference(defaults) else "-",
                        "online" if m.online else "offline", ", ".join(m.metrics))
    console.print(methods)
    preset_of = {p: a.name for a in ADAPTERS.values() for p in a.presets}  # dora, pissa: presets of lora
    grid = Table(title="valid method x adapter pairs (" + ", ".join(f"{p}: a preset of {a}" for p, a in
                                                                    preset_of.items()) + ")")
    grid.add_column("method")
    for a in [*ADAPTERS, *preset_of]:
        grid.add_column(a, justify="center")
    for m in METHODS.values():
        grid.add_row(m.name, *("yes" if preset_of.get(a, a) in m.adapters else "-" for a in [*ADAPTERS, *preset_of]))
    grid.caption = ("lora/qlora options: adapter.use_dora, adapter.use_rslora, adapter.init=default|gaussian|pissa|"
                    "pissa_niter_K|olora|loftq|eva, train.loraplus_lr_ratio; refused: qlora with pissa/olora, lora "
                    "with loftq, use_dora with pissa/olora; `alignkit export` merges all but prompt/prefix")
    console.print(grid)
    recipes = Table(title="recipes (alignkit recipe NAME)")
    recipes.add_column("recipe")
    recipes.add_column("stages")
    recipes.add_column("what")
    for name in recipe_names():
        spec = load_recipe(name)
        recipes.add_row(name, " -> ".join(spec.stages), spec.description)
    console.print(recipes)
    return 0


def _train(args: list[str]) -> int:
    from omegaconf import OmegaConf

    from .config.compose import check_overrides, expand_sweeps
    from .methods import compose, validate

    multirun = any(a in ("-m", "--multirun") for a in args)
    show_cfg = "--cfg" in args
    overrides = [a for a in args if a not in ("-m", "--multirun", "--cfg")]
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        raise UsageError(f"unknown option {unknown[0]} (see alignkit --help)")
    check_overrides(overrides, multirun)
    jobs = expand_sweeps(overrides) if multirun else [overrides]
    # compose and validate every job before running any, so a bad value fails fast
    cfgs = [compose(job) for job in jobs]
    for cfg in cfgs:
        validate(cfg)
    base = cfgs[0].run.dir
    if multirun:
        for i, cfg in enumerate(cfgs):
            cfg.run.dir = os.path.join(base, str(i))
    if show_cfg:
        for cfg in cfgs:
            print(OmegaConf.to_yaml(cfg))
        return 0
    from .launch import spawn
    from .session import under_launcher

    if cfgs[0].launcher.value == "torchrun" and not under_launcher():
        return spawn(args, cfgs, base)
    several = under_launcher()
    if several:  # started by torchrun: rank 0's run.dir (its ${now}) for all
        from .session import dist

        dist.setup()
        for cfg in cfgs:
            cfg.run.dir = dist.broadcast(cfg.run.dir)
    from .session import startup
    from .session.rundir import preflight

    for i, (job, cfg) in enumerate(zip(jobs, cfgs)):
        if multirun and _is_main():
            print(f"[job {i}] {' '.join(job)}", file=sys.stderr)
        startup.begin()  # the first job from alignkit's import: its config phase includes composing every job
        startup.mark("config")
        rows = preflight(cfg)  # run dir and data checks fail before the training code is even imported
        startup.mark("read_data")
        from .train import run_train

        startup.mark("import")
        try:
            run_train(cfg, rows)
        except Interrupted as exc:
            if _is_main():
                print(_resume_hint(exc, job), file=sys.stderr)
            return 130
        finally:
            startup.end()
    if several:
        dist.teardown()
    return 0


def _is_main() -> bool:
    """Rank 0 of a torchrun job, or the only process: the one that prints errors and hints."""
    return os.environ.get("RANK", "0") == "0"


def _resume_hint(exc: Interrupted, job: list[str]) -> str:
    """One line: where the checkpoint is and the exact command that continues the run."""
    if exc.run_dir is None:
        return f"alignkit: interrupted at step {exc.step}; the new run was discarded, the earlier one kept"
    keep = [a for a in job if not a.lstrip("+~").startswith(("run.dir=", "run.resume=", "run.overwrite="))]
    command = shlex.join(["alignkit", "train", *keep, f"run.dir={exc.run_dir}", "run.resume=true"])
    return f"alignkit: interrupted at step {exc.step}, checkpoint {exc.checkpoint}; to continue: {command}"


def _export(args: list[str]) -> int:
    from .export.run import run_export

    run_export(args)
    return 0


def _compress(args: list[str]) -> int:
    """base=PATH finetuned=PATH are model.path and adapter.finetuned with adapter=bitdelta."""
    from omegaconf import OmegaConf

    from .config.compose import check_overrides
    from .methods import compose, validate

    if any(a in ("-m", "--multirun") for a in args):
        raise UsageError("compress runs one job: -m is not supported")
    show_cfg = "--cfg" in args
    overrides = [a for a in args if a != "--cfg"]
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        raise UsageError(f"unknown option {unknown[0]} (see alignkit --help)")
    check_overrides(overrides, multirun=False)
    keys = [a.split("=", 1)[0] for a in overrides]
    if not {"base", "model", "model.path"} & set(keys):
        raise UsageError("compress needs base=PATH (the model before fine-tuning) and finetuned=PATH")
    if any(a.startswith("adapter=") and a != "adapter=bitdelta" for a in overrides):
        raise UsageError("compress makes BitDelta artifacts: adapter must be bitdelta")
    renamed = {"base": "model.path", "finetuned": "adapter.finetuned"}
    overrides = [f"{renamed[k]}={a.split('=', 1)[1]}" if k in renamed else a for k, a in zip(keys, overrides)]
    cfg = compose(["adapter=bitdelta", "run.dir=runs/compress-${now:%Y%m%d-%H%M%S}", *overrides])
    validate(cfg, verb="compress")
    if show_cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from .bitdelta.pipeline import run_compress

    run_compress(cfg)
    return 0


def _recipe(args: list[str]) -> int:
    from .recipe.plan import recipe_names
    from .recipe.run import run_recipe

    if not args or args[0].startswith("-") or "=" in args[0]:
        raise UsageError(f"usage: alignkit recipe NAME [overrides] (recipes: {', '.join(recipe_names())})")
    from .session import under_launcher

    if under_launcher() or any(a.startswith(("launcher=", "nproc=")) for a in args):
        raise UsageError("alignkit recipe runs its stages in one process: launcher, nproc and torchrun are for "
                         "alignkit train (run each stage with it)")
    rest = [a for a in args[1:] if a != "--cfg"]
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        raise UsageError(f"alignkit recipe takes no option {flags[0]} (only --cfg; a recipe runs no sweeps)")
    run_recipe(args[0], rest, show_cfg="--cfg" in args)
    return 0


def _quiet_library_warnings() -> None:
    """Deprecation chatter from torch/transformers internals that a user cannot act on."""
    import warnings

    for pattern in (r"`is_gradient_checkpointing` is deprecated", r"`torch.jit.script_method` is deprecated"):
        warnings.filterwarnings("ignore", message=pattern)


def _evaluate(args: list[str]) -> int:
    from .eval.run import run_eval

    run_eval(args)
    return 0


def _generate(args: list[str]) -> int:
    from .eval.run import run_generate

    run_generate(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _quiet_library_warnings()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    verb, args = argv[0], argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    verbs = {"train": lambda: _train(args), "compress": lambda: _compress(args), "list": _list,
             "eval": lambda: _evaluate(args), "generate": lambda: _generate(args), "recipe": lambda: _recipe(args),
             "export": lambda: _export(args)}
    try:
        if verb not in verbs:
            raise UsageError(f"unknown verb '{verb}' (choose from {', '.join(verbs)}; see alignkit --help)")
        return verbs[verb]()
    except KeyboardInterrupt:
        if os.environ.get("ALIGNKIT_DEBUG") == "1":
            raise
        print("\nalignkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every user-facing failure becomes one line
        if os.environ.get("ALIGNKIT_DEBUG") == "1":
            raise
        if isinstance(exc, OSError) and io_error(exc, exc.filename or "output"):
            exc = io_error(exc, exc.filename or "output")  # disk full, permission denied: one line
        if not _is_user_error(exc):
            raise
        if _is_main():  # every process of a torchrun job meets the same bad input: one line
            print(f"alignkit: error: {_one_line(exc) if not isinstance(exc, UsageError) else exc}", file=sys.stderr)
        return 2


def _is_user_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, (UsageError, HydraException, OmegaConfBaseException))


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
