"""What every loss of the family shares: input checks, fp32 outside autocast, the ranks' batch sizes,
the tile edge, and the split of the returned scalar into the global value and this rank's gradient.

A loss of the family is computed over the global batch (all ranks' pairs in rank order). Each rank
evaluates only its own images' rows of the pair matrix against every gathered text (plus, for UniCL, its
texts' columns), never holding a B x N matrix: the subclass returns this rank's share ``L_r`` of the sum
that defines the loss, and the shares add up to the global loss over ranks.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from utils.distributed import all_reduce_sum, gather_sizes, get_world_size

from .targets import GlobalTargets, Targets, check_targets, gather_targets

# Tile edges are rounded to this many rows/columns: GEMMs run at full speed on aligned shapes.
_TILE_ALIGN = 128
# On CPU one T x T tile gets this many bytes (two are live). On the shared 2-core benchmark machine,
# B = 16384, alternating runs: 0.73x ClipLoss's time with 16 MiB tiles, 0.58x with 64 MiB (fewer ops).
_CPU_TILE_BYTES = 64 * 2**20
# On CUDA one tile gets this share of the memory free for new tensors, within these bounds.
_CUDA_TILE_SHARE = 16
_CUDA_TILE_BYTES_MIN = 64 * 2**20
_CUDA_TILE_BYTES_MAX = 2**30


def resolve_tile_size(tile_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Edge T of the T x T logit tiles: ``tile_size`` itself if positive, else chosen for the device.

    Automatic rule: a tile gets a memory budget (64 MiB on CPU; on CUDA 1/16 of the memory free for
    new tensors, i.e. free device memory plus what torch's allocator holds unused, clamped to
    [64 MiB, 1 GiB]); T is the largest multiple of 128 whose T x T tile of ``dtype`` fits it
    (fp32: 4096 on CPU, 4096 to 16384 on CUDA).
    """
    if tile_size > 0:
        return tile_size
    budget = _cuda_tile_bytes(device) if device.type == "cuda" else _CPU_TILE_BYTES
    edge = math.isqrt(budget // (torch.finfo(dtype).bits // 8))
    return max(_TILE_ALIGN, edge // _TILE_ALIGN * _TILE_ALIGN)


def _cuda_tile_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    # Blocks torch's caching allocator holds but does not use are free for our tiles too.
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    share = (free + cached) // _CUDA_TILE_SHARE
    return min(max(share, _CUDA_TILE_BYTES_MIN), _CUDA_TILE_BYTES_MAX)


def spans(n: int, tile: int) -> Iterator[slice]:
    """Consecutive slices of at most ``tile`` covering ``range(n)``."""
    return (slice(i, min(i + tile, n)) for i in range(0, n, tile))


class GlobalBatchLoss(nn.Module):
    """Base of the loss family: ``forward(image_features, text_features, targets, *logit_params)``.

    ``forward`` returns a scalar whose **value** is the global loss L (identical on every rank, so
    ``loss.item()`` on rank 0 logs L) and whose **gradient** is ``world_size * dL_r``. DDP averages
    parameter gradients over ranks, and the average of ``world_size * dL_r`` is ``sum_r dL_r = dL``, so
    after ``loss.backward()`` every rank holds exactly the gradient of the global loss. Without DDP
    (single process, world_size 1) both are plain L. The split costs one scalar all_reduce per step.

    Subclasses name their logit parameters (``logit_params``: the exponentiated scale, and for the
    sigmoid loss a bias) and implement :meth:`local_sum`.

    Args:
        tile_size: edge T of the T x T logit tiles; 0 chooses it from the device (see
            :func:`resolve_tile_size`). Any value gives the same loss and gradients.
        unique_pairs: ignore the labels, each pair its own class (the CLIP baseline).
    """

    logit_params: Tuple[str, ...] = ("logit_scale",)
    # The loss is the sum of local_sum over ranks divided by terms_per_pair * N.
    terms_per_pair = 1

    def __init__(self, tile_size: int = 0, unique_pairs: bool = False) -> None:
        super().__init__()
        if tile_size < 0:
            raise ValueError(f"tile_size must be >= 0 (0: automatic), got {tile_size}")
        self.tile_size = tile_size
        self.unique_pairs = unique_pairs

    def forward(self, image_features: Tensor, text_features: Tensor, targets: Targets, *logit_params: Tensor) -> Tensor:
        """Compute the loss for this rank's slice of the global batch.

        Args:
            image_features: ``[B, D]`` L2-normalized image embeddings of this rank.
            text_features: ``[B, D]`` L2-normalized text embeddings of this rank.
            targets: ``[B]`` integer global label ids (same id => positive pair), or ``MixedTargets``.
            logit_params: scalars named by ``logit_params``, the scale already exponentiated.
        """
        self._check_inputs(image_features, text_features, targets, logit_params)
        # Under autocast the matmul would run in bf16/fp16; sums over thousands of logits need fp32 to
        # stay accurate, so autocast is switched off and inputs are upcast (float64 stays float64).
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            dtype = torch.promote_types(
                torch.promote_types(image_features.dtype, text_features.dtype), torch.float32
            )
            img = image_features.to(dtype)
            txt = text_features.to(dtype)
            params = [p.to(dtype).reshape(()) for p in logit_params]
            sizes = gather_sizes(len(targets), img.device)
            tile = resolve_tile_size(self.tile_size, dtype, img.device)
            local_sum = self.local_sum(img, txt, gather_targets(targets, sizes, self.unique_pairs, img.device),
                                       params, sizes, tile)

        per_rank = local_sum / (self.terms_per_pair * sum(sizes))
        grad_path = per_rank * get_world_size()
        global_value = all_reduce_sum(per_rank)
        # Value of global_value, gradient of grad_path (see class docstring).
        return grad_path + (global_value - grad_path).detach()

    def local_sum(self, img: Tensor, txt: Tensor, targets: GlobalTargets, params: Sequence[Tensor],
                  sizes: List[int], tile: int) -> Tensor:
        """This rank's share of the loss's sum over the global batch."""
        raise NotImplementedError

    def _check_inputs(self, image: Tensor, text: Tensor, targets: Targets, params: Sequence[Tensor]) -> None:
        # Shape errors would otherwise surface as broadcasting surprises or, in the
        # distributed case, as a hang inside a collective.
        if image.ndim != 2 or image.shape != text.shape:
            raise ValueError(
                f"image and text features must both be [B, D], got {tuple(image.shape)} and {tuple(text.shape)}"
            )
        check_targets(targets, image.shape[0])
        if len(params) != len(self.logit_params):
            raise ValueError(f"{type(self).__name__} takes {len(self.logit_params)} logit parameter(s) "
                             f"({', '.join(self.logit_params)}), got {len(params)}")
        for name, param in zip(self.logit_params, params):
            if param.numel() != 1:
                raise ValueError(f"{name} must be a scalar, got shape {tuple(param.shape)}")
