"""Several processes (torchrun, accelerate launch): who we are, the collectives the loops need,
and the model wrapped for DDP or FSDP2. With one process every helper is a no-op.

Each process reads the whole data set and takes its part of every global micro-batch
(`share`); losses are divided by the step's global count and scaled by the world size,
because DDP and FSDP average gradients over the processes: the update is then the one a
single process makes on the global batch. Logged numbers are global (sums all-reduced).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..errors import UsageError
from ..forward.packed import causal_lm
from . import under_launcher


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def distributed() -> bool:
    """Under torchrun (a process group), even with one process."""
    return dist.is_initialized()


def is_main() -> bool:
    return rank() == 0


def setup() -> torch.device:
    """This process's device (cuda:LOCAL_RANK, or the CPU); under torchrun, join the process group:
    nccl on GPUs, gloo on the CPU. Safe to call again (a recipe's next stage)."""
    from ..models.load import pick_device

    device = pick_device()
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK={device.index} but this machine has {torch.cuda.device_count()} GPU(s): "
                             f"start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(device)
    if under_launcher() and not dist.is_initialized():  # also a one-process torchrun: FSDP then runs as such
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share(batch: list, rank: int, world: int) -> tuple[list, int]:
    """This process's part of a global micro-batch: (rows, how many are real).

    The batch is cut into `world` contiguous parts as torch.tensor_split does (exactly batch_size each
    when it is full; else the first parts are one row longer). A process whose part is empty gets a
    one-row stand-in with 0 real rows: it still runs its forward and backward, weighted 0, so every
    process makes the same collective calls.
    """
    size, extra = divmod(len(batch), world)
    lo = rank * size + min(rank, extra)
    hi = lo + size + (rank < extra)
    return (batch[lo:hi], hi - lo) if hi > lo else (batch[:1], 0)


def _device() -> torch.device:
    """Where collectives run: the current GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the processes (every process passes the same keys)."""
    if world() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    summed = dict(zip(keys, t.tolist()))
    return {k: summed[k] for k in values}  # in the caller's order (the keys were sorted to match up)


def all_mean(values: dict[str, float], weight: float) -> dict[str, float]:
    """Each value averaged over the processes, weighted by `weight` (e.g. this process's rows);
    weight 0 adds nothing (not even a NaN)."""
    if world() == 1:
        return dict(values)
    summed = all_sum({**{k: v * weight if weight else 0.0 for k, v in values.items()}, "\0weight": weight})
    total = summed.pop("\0weight")
    return {k: v / total for k, v in summed.items()}


def any_rank(flag: bool) -> bool:
    """True on every process when it is true on any (a Ctrl-C that reached only some of them)."""
    return all_sum({"flag": float(flag)})["flag"] > 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast(value):
    """Rank 0's value (any picklable object) on every process."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(fn):
    """fn() on rank 0, then on the others: rank 0 fills a cache (a model build, reference log-probs)
    that the others then read instead of writing it at the same time."""
    if not is_main():
        barrier()
    out = fn()
    if is_main():
        barrier()
    return out


class LossModule(torch.nn.Module):
    """A method's loss function on the model as one module call, so that DDP or FSDP sees exactly one
    forward per backward although the loss calls the model (and its parts) several times."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict, denominator):
        return self.loss_fn(self.model, batch, denominator)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: transformers names their class in _no_split_modules."""
    base = causal_lm(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap(model, loss_fn, strategy: str, device: torch.device) -> torch.nn.Module:
    """LossModule(model, loss_fn), under DDP or FSDP2 when there are several processes.

    FSDP2 shards each decoder layer and, at the root, what is left (embeddings, head, adapters'
    virtual tokens); its parameters become DTensors in place, so the optimizer is made after this.
    """
    forward = LossModule(model, loss_fn)
    if strategy == "fsdp" and dist.is_initialized():  # one process under torchrun included: one shard each
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):  # a bitsandbytes 4-bit Linear on a CPU
                # whose eval-mode kernel repacks weight.data in place: under FSDP that is a gathered copy,
                # rebuilt at every forward without the repacked state (wrong outputs); keep the training kernel
                module.support_avx512bf16_for_cpu = False
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(forward)
        return forward
    if world() == 1:
        return forward
    from torch.nn.parallel import DistributedDataParallel

    # no buffers to keep in step (no batch norm); a broadcast per forward would only cost
    return DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def sync_gradients(forward, sync: bool):
    """Context for one micro-batch's forward and backward: all but a step's last skip the gradient
    all-reduce (DDP no_sync, FSDP2 set_requires_gradient_sync); gradients add up locally meanwhile."""
    if hasattr(forward, "set_requires_gradient_sync"):  # FSDP2
        forward.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not hasattr(forward, "no_sync"):
        return contextlib.nullcontext()
    return forward.no_sync()


def sharded(t) -> bool:
    """An FSDP shard (a DTensor); DTensor's module is imported only in a multi-process run."""
    if not dist.is_initialized():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a collective: every process calls it, in the same order)."""
    return t.full_tensor() if sharded(t) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `param` is: this process's shard when param is an FSDP DTensor.

    Every process holds the same whole tensor (read from a checkpoint), so each takes its own
    part without communicating (src_data_rank=None)."""
    if not sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def gathered_state(model) -> dict | None:
    """model.state_dict() with whole CPU tensors on rank 0 (None elsewhere) when FSDP shards the
    model; None when it is not sharded (save_pretrained reads the model itself then)."""
    state = model.state_dict()
    if not any(sharded(v) for v in state.values()):
        return None
    out = {}
    for name, value in state.items():
        value = full(value)
        if is_main():
            out[name] = value.detach().cpu()
    return out if is_main() else None
