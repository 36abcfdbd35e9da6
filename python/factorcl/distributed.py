"""Data-parallel helpers: each rank holds ``n`` rows of a global batch of ``world * n``; critics
score the local rows against the globally gathered columns, with the positive of local row i at
column ``rank * n + i`` (``pos_offset``).

Gradients: the gather's backward all-reduces the column gradients and keeps this rank's slice,
so after :meth:`Comm.average_gradients` every rank holds the gradient of the mean of the ranks'
losses, which is the loss of the global batch (each rank's loss is a mean over its rows).
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Comm", "init_from_env"]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, world: int, rank: int):
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank's loss depends on this rank's rows: their gradient is the sum over ranks.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None


class Comm:
    """Rank and world size, and the few collectives the trainer needs (no-ops for one process).
    ``device``: where the process group's backend takes tensors (the rank's GPU for nccl, which
    refuses CPU tensors); the scalars of :meth:`mean` and :meth:`mean_and_any` are made there."""

    def __init__(self, rank: int = 0, world: int = 1, device=torch.device("cpu")):
        self.rank, self.world = rank, world
        self.device = torch.device(device)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, x: Tensor) -> Tensor:
        """All ranks' ``x`` concatenated in rank order; differentiable."""
        if self.world == 1:
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            return _GatherWithGrad.apply(x, self.world, self.rank)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    def local_slice(self, n_global: int) -> slice:
        n = n_global // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def pos_offset(self, n_local: int) -> int:
        return self.rank * n_local

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:  # the same flat layout on every rank
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for p in params:
            k = p.numel()
            p.grad.copy_(flat[offset:offset + k].view_as(p.grad))
            offset += k

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world

    def mean_and_any(self, value: float, flag: bool) -> tuple[float, bool]:
        """:meth:`mean` of ``value`` and whether ``flag`` is set in any process, in one
        all-reduce (once a step)."""
        if self.world == 1:
            return value, flag
        t = torch.tensor([value, 1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        total, any_flag = t.tolist()
        return total / self.world, any_flag > 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_from_env(device: torch.device) -> Comm:
    """A :class:`Comm` from torchrun's environment (``WORLD_SIZE``, ``RANK``), initialising the
    process group (gloo on CPU, nccl on CUDA, ``device`` being this rank's) when more than one
    process runs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Comm()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Comm(dist.get_rank(), dist.get_world_size(), device)
