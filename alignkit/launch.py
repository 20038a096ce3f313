"""`alignkit train launcher=torchrun nproc=N`: start the same command again under torchrun.

Everything that can fail without the training processes fails here first, as one line and
exit 2 (config, run dir, data, model path); then torchrun starts N
processes on this machine and its exit code is ours. run.dir is resolved here, so every
process writes the same `${now:...}` directory.
"""
from __future__ import annotations

import subprocess
import sys


def torchrun_command(args: list[str], run_dir: str, nproc: int) -> list[str]:
    """python -m torch.distributed.run --standalone (a free local port) ... -m alignkit train ARGS run.dir=DIR."""
    if not any(a.lstrip("+~").startswith("run.dir=") for a in args):
        args = [*args, f"run.dir={run_dir}"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "alignkit", "train", *args]


def spawn(args: list[str], cfgs: list, run_dir: str) -> int:
    """Check each job as far as a machine without the processes can, then run torchrun; its exit code."""
    import torch

    from .errors import UsageError
    from .models.load import resolve_model_dir
    from .runs.read import base_model_cfg
    from .session.rundir import preflight

    gpus = torch.cuda.device_count()
    if 0 < gpus < cfgs[0].nproc:  # on the CPU (gloo) any number of processes runs
        raise UsageError(f"nproc={cfgs[0].nproc}: this machine has {gpus} GPU(s); start at most one process per GPU")
    for cfg in cfgs:
        preflight(cfg)
        resolve_model_dir(base_model_cfg(cfg).path)  # builds the model cache once, before N processes want it
    command = torchrun_command(args, run_dir, cfgs[0].nproc)
    print(f"alignkit: starting {cfgs[0].nproc} processes: {' '.join(command[1:])}", file=sys.stderr)
    process = subprocess.Popen(command)
    interrupted = False
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops its processes: wait for it
            interrupted = True
    return 130 if interrupted and code != 0 else code
