"""Multi-process tests in one call: forked processes joined in a gloo group, each computes its results,
and the test reads them back in rank order."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, List

import torch
import torch.distributed as dist
from torch import Tensor

from tests.conftest import run_ranks
from utils.distributed import destroy_distributed


def run_in_gloo_group(compute: Callable[[int], Any], tmp_path: Path, world: int = 2) -> List[Any]:
    """``compute(rank)`` in ``world`` processes of one gloo group; their results (what torch.save writes), in
    rank order."""
    run_ranks(_worker, args=(compute, str(tmp_path), world), nprocs=world)
    return [torch.load(tmp_path / f'rank{rank}.pt', weights_only=True) for rank in range(world)]


def _worker(rank: int, compute: Callable[[int], Any], out_dir: str, world: int) -> None:
    dist.init_process_group('gloo', init_method=f'file://{os.path.join(out_dir, "store")}', rank=rank,
                            world_size=world)
    try:
        torch.save(compute(rank), os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        destroy_distributed()


def ddp_average(grads: Iterable[Tensor]) -> None:
    """What DDP does to parameter gradients: each becomes its mean over the ranks, in place."""
    for grad in grads:
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
