"""Small wrappers around ``torch.distributed``.

They let training and loss code be written once and run unchanged as a plain
single process (no process group at all) or under ``torchrun``: every helper
falls back to the local answer when no process group is initialized.

Collectives here work with both NCCL (CUDA tensors) and gloo (CPU tensors) and
accept per-rank batches of different lengths along dim 0, because the last
batch of an epoch is not always split evenly and a silent shape mismatch in
``all_gather`` corrupts data or hangs instead of raising.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    """True when collectives must be used.

    ``is_available`` is checked first because builds without distributed
    support raise on any other ``torch.distributed`` call.
    """
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank in the default group; 0 for a single process."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """Number of processes in the default group; 1 for a single process."""
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """Whether this process should do the once-per-job work (logging, checkpoints)."""
    return get_rank() == 0


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. With ``WORLD_SIZE`` unset
    or 1 nothing is initialized, so single-process runs and unit tests need no
    rendezvous. The timeout makes the surviving ranks fail with an error when a
    peer dies, instead of blocking forever in the next collective (for NCCL
    this relies on its async error handling, which torch enables by default).

    Returns:
        ``(rank, world_size, local_rank)``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if is_dist():
        return rank, world_size, local_rank

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        # Must precede init: otherwise every rank's NCCL communicator and
        # default allocations land on cuda:0.
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return rank, world_size, local_rank


# How long gloo's threads get to drop the last collective's tensors before the group is destroyed.
GLOO_RELEASE_SECONDS = 0.05


def destroy_distributed() -> None:
    """Leave the process group, if there is one.

    Before torch 2.8 (pytorch/pytorch#154976) gloo's destructor keeps the GIL while it joins its worker
    threads, and a worker still dropping the tensors of the last collective needs the GIL for that: both
    wait forever. On torch 2.4 this hung 2 of 8 runs of a test that gathers and then leaves at once.
    Sleeping releases the GIL, so the workers finish first.
    """
    if not is_dist():
        return
    if dist.get_backend() == "gloo":
        time.sleep(GLOO_RELEASE_SECONDS)
    dist.destroy_process_group()


def gather_sizes(n: int, device: torch.device) -> List[int]:
    """Length along dim 0 of every rank's tensor, in rank order.

    Computing it once and passing it to several gathers saves one small
    collective per gather. ``device`` must suit the backend (CUDA for NCCL).
    """
    if not is_dist():
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    parts = [torch.empty_like(local) for _ in range(get_world_size())]
    dist.all_gather(parts, local)
    return [int(p.item()) for p in parts]


def _own_slice(sizes: List[int]) -> slice:
    start = sum(sizes[: get_rank()])
    return slice(start, start + sizes[get_rank()])


def _gather_cat(t: Tensor, sizes: List[int]) -> Tensor:
    # all_gather needs identical shapes on every rank, so shorter tensors are
    # zero-padded to the longest and the padding is cut off afterwards.
    longest = max(sizes)
    if t.shape[0] < longest:
        pad = t.new_zeros((longest - t.shape[0],) + tuple(t.shape[1:]))
        t = torch.cat([t, pad])
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns d(sum over ranks of their losses)/d(own input).

    Every rank computes a *different* partial loss L_r from the gathered
    tensor, and the objective is L = sum_r L_r. The gradient of L w.r.t. this
    rank's slice therefore has a term from every rank's L_r, so backward
    all-reduces (SUM) the incoming gradient and keeps this rank's slice.
    Keeping only the local slice without the reduction would drop the terms
    contributed by the other ranks' losses and give a wrong gradient.
    """

    @staticmethod
    def forward(ctx, t: Tensor, sizes: List[int]) -> Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        return _gather_cat(t, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Clone because all_reduce works in place and autograd may hand the
        # same gradient buffer to other consumers.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[_own_slice(ctx.sizes)], None


def all_gather_with_grad(t: Tensor, sizes: Optional[List[int]] = None) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0, in rank order, keeping autograd.

    Dims other than 0 must match across ranks. The backward pass is itself a
    collective, so every rank must run backward through this op. Returns ``t``
    unchanged when not distributed.
    """
    if not is_dist():
        return t
    if sizes is None:
        sizes = gather_sizes(t.shape[0], t.device)
    return _AllGatherWithGrad.apply(t, sizes)


def all_gather_no_grad(t: Tensor, sizes: Optional[List[int]] = None) -> Tensor:
    """Like :func:`all_gather_with_grad` for values that need no gradient (labels, ids).

    The result is always detached, distributed or not, so callers behave the
    same in both modes.
    """
    t = t.detach()
    if not is_dist():
        return t
    if sizes is None:
        sizes = gather_sizes(t.shape[0], t.device)
    return _gather_cat(t, sizes)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks, as a new detached tensor (for logged values, not for losses)."""
    t = t.detach().clone()
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks, as a new detached tensor (for metrics logged on rank 0)."""
    return all_reduce_sum(t) / get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (any picklable object); ``obj`` itself when not distributed."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order; ``[obj]`` when not distributed."""
    if not is_dist():
        return [obj]
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_max(t: Tensor) -> Tensor:
    """Maximum of ``t`` over ranks, as a new detached tensor."""
    t = t.detach().clone()
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    """Wait for every rank (nothing when not distributed)."""
    if is_dist():
        dist.barrier()
