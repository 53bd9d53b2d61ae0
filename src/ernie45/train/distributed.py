"""Data parallelism under `torchrun`: process-group setup (gloo on CPU, nccl on CUDA) and gradient sums.

Fine-tuning normalises the loss by the token count of the whole global batch, so each rank's gradient is
its share of the global gradient and ranks *sum* them (one flat all-reduce per step). That keeps N processes
numerically equivalent to one with the same global batch, whatever the per-rank token counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the `torchrun` process group when WORLD_SIZE > 1; returns (Dist, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local), device


def all_reduce_sum(tensors: list[torch.Tensor], d: Dist) -> None:
    """Sum tensors across ranks in place through one flat buffer."""
    if d.world == 1 or not tensors:
        return
    import torch.distributed as dist

    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat)
    off = 0
    for t in tensors:
        t.copy_(flat[off : off + t.numel()].view_as(t))
        off += t.numel()


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
