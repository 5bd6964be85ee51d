"""Collectives for several processes, each a plain pass-through with one process.

Everything here reads the world from ``torch.distributed`` (set up by Accelerate or
torchrun); when it is not initialised, or has one process, every function returns its
input untouched, so single-process code paths are exactly the plain ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every process the gradient of its own rows,
    summed over the processes that used them (all_reduce, then the local slice).

    The usual reduce-scatter form (torch.distributed.nn.all_gather) needs all_to_all
    on gloo, which gloo lacks; all_reduce works on every backend.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_world()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every process, in rank order, with gradient back to each
    process's own rows; ``x`` itself with one process. Every process must pass the same
    number of rows (training loaders drop the last partial batch and Accelerate evens
    the batches)."""
    if rank_world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every process, in rank order, without gradient; ``x`` with one process."""
    world = rank_world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def all_gather_objects(obj: Any) -> list[Any]:
    """One picklable object from every process, in rank order; ``[obj]`` with one process."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (a new tensor); ``x`` with one process."""
    if rank_world()[1] == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def global_count(n: int | torch.Tensor, device: torch.device) -> int:
    """``n`` (a count of this process's rows, or a mask of them) summed over processes:
    one all_reduce, so every process calls it, also with no rows; ``n`` with one process."""
    local = int(n.sum()) if isinstance(n, torch.Tensor) else int(n)
    if rank_world()[1] == 1:
        return local
    return int(all_reduce_sum(torch.tensor(float(local), device=device)).item())


def mean_share(values: torch.Tensor, total: int) -> torch.Tensor:
    """This process's share of the mean of ``values`` over all processes' ``total``
    elements (:func:`global_count`): sum(values) * processes / total. DDP averages the
    processes' gradients, so the average of the shares, and its gradient, is the mean
    over the global batch; the per-process mean is not, when a loss covers a subset of
    rows (those with a box, a relation, answer tokens) whose size differs between
    processes. With one process, the plain mean."""
    world = rank_world()[1]
    if world == 1:
        return values.mean()
    return values.sum() * (world / max(total, 1))
