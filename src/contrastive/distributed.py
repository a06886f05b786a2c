"""torch.distributed helpers. Under torchrun (RANK in the environment) the
training loop becomes DistributedDataParallel; without it every helper is the
identity, so methods call them unconditionally."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def setup(timeout_s: float = 300.0) -> torch.device | None:
    """Join the process group torchrun describes and return this rank's device.

    Returns None when the process was not launched by torchrun.

    The timeout bounds every collective, so one failed rank makes the others
    exit with an error instead of waiting forever.
    """
    if "RANK" not in os.environ:
        return None
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not is_distributed():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    return device


def cleanup() -> None:
    """Leave the process group; the barrier lets every rank finish its last collective first,
    since tearing gloo down while a peer is still talking to it can abort the process."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums, over ranks, the gradients that reach each rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)  # every rank computed the loss on the whole gathered batch
        return stacked[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks along dim 0, letting gradients flow back to each rank's own rows."""
    if not is_distributed():
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks along dim 0, without gradient; x itself when not distributed."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a random permutation of the global batch, and the index that undoes it.

    The global batch is x gathered from every rank (all ranks pass the same number
    of rows); rank 0 draws the permutation and broadcasts it, so the ranks' slices
    partition the global batch. Without a process group: x[perm] and argsort(perm).
    """
    gathered = concat_all_gather(x)
    perm = torch.randperm(len(gathered), device=x.device)
    if is_distributed():
        dist.broadcast(perm, src=0)
    return gathered[perm.view(world_size(), -1)[rank()]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo `batch_shuffle`: gather the shuffled slices, return this rank's rows in their original order."""
    return concat_all_gather(x)[unshuffle.view(world_size(), -1)[rank()]]
