"""What a loss is told about each pair: a label, or after mixup a label mixed with a partner's.

Plain targets are an integer tensor ``[B]`` of label ids (same id => positive pair). Mixup (data/mixup.py)
blends image i with the image at position ``partner[i]`` of the same batch, ``lam[i]`` of its own and
``1 - lam[i]`` of the partner's; its targets are :class:`MixedTargets`. Texts are never mixed.

With one-hot label rows Y (texts) and mixed rows Y~_i = lam_i e(y_i) + (1 - lam_i) e(y_partner(i))
(images), the weight of the pair (image i, text j) is ``W = Y~ Y^T``:

    W_ij = lam_i [y_i == y_j] + (1 - lam_i) [y_partner(i) == y_j]

Unmixed (lam 1, or a partner with the same label) W is the 0/1 positive mask of the plain labels.
:func:`gather_targets` turns a rank's targets into the global batch's, which every loss reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from utils.distributed import all_gather_no_grad, get_rank


@dataclass(frozen=True)
class MixedTargets:
    """Targets of a mixed batch of B images (all ``[B]``, on one device)."""

    labels: Tensor  # integer label id of each image's own pair (its text's label)
    partner: Tensor  # integer position, in the same batch, of the image mixed into it
    lam: Tensor  # float weight of the own label; 1 - lam goes to the partner's label

    def to(self, device: torch.device, non_blocking: bool = False) -> "MixedTargets":
        return MixedTargets(*(t.to(device, non_blocking=non_blocking) for t in (self.labels, self.partner, self.lam)))

    def __len__(self) -> int:
        return self.labels.shape[0]


Targets = Union[Tensor, MixedTargets]


def cat_targets(parts: Sequence[Targets]) -> Targets:
    """Targets of consecutive batches as one batch (partner positions move with their batch)."""
    if all(isinstance(p, Tensor) for p in parts):
        return torch.cat(list(parts))
    if not all(isinstance(p, MixedTargets) for p in parts):
        raise TypeError("cannot concatenate plain label tensors with MixedTargets")
    starts = torch.tensor([0] + [len(p) for p in parts[:-1]]).cumsum(0).tolist()
    return MixedTargets(torch.cat([p.labels for p in parts]),
                        torch.cat([p.partner + start for p, start in zip(parts, starts)]),
                        torch.cat([p.lam for p in parts]))


def check_targets(targets: Targets, batch: int) -> None:
    """Shapes and kinds; a wrong shape would otherwise broadcast, or hang a collective when distributed."""
    parts = [targets] if isinstance(targets, Tensor) else [targets.labels, targets.partner]
    for part in parts:
        if part.shape != (batch,) or part.is_floating_point():
            raise ValueError(
                f"labels must be an integer tensor of shape [{batch}], got {part.dtype} {tuple(part.shape)}")
    if isinstance(targets, MixedTargets):
        if targets.lam.shape != (batch,) or not targets.lam.is_floating_point():
            raise ValueError(f"lam must be a float tensor of shape [{batch}], got {targets.lam.dtype} "
                             f"{tuple(targets.lam.shape)}")


@dataclass(frozen=True)
class GlobalTargets:
    """The targets of the global batch (all ranks in rank order, N pairs) and this rank's part of it."""

    labels: Tensor  # [N] label of each pair (its text's label, its image's own label)
    own: slice  # this rank's pairs
    partner_labels: Optional[Tensor] = None  # [N] label mixed into each image; None: unmixed
    lam: Optional[Tensor] = None  # [N] weight of each image's own label; None: unmixed

    @property
    def mixed(self) -> bool:
        return self.lam is not None


def gather_targets(targets: Targets, sizes: List[int], unique_pairs: bool, device: torch.device) -> GlobalTargets:
    """Every rank's targets, on ``device``. ``unique_pairs`` (the CLIP baseline) ignores the labels: each
    pair gets its position in the global batch as its label, which is unique across ranks by construction,
    and a mixed image's partner label is its partner's global position."""
    start = sum(sizes[: get_rank()])
    own = slice(start, start + sizes[get_rank()])
    total = sum(sizes)
    if isinstance(targets, Tensor):
        # NCCL can only gather tensors that live on the GPU.
        labels = torch.arange(total, device=device) if unique_pairs else all_gather_no_grad(targets.to(device), sizes)
        return GlobalTargets(labels, own)
    # One gather for labels and partners: they share a dtype; lam has its own.
    labels = targets.labels.to(device)
    local = torch.stack([labels, targets.partner.to(device, labels.dtype) + start], dim=1)
    ids = all_gather_no_grad(local, sizes)
    lam = all_gather_no_grad(targets.lam.to(device), sizes)
    labels = torch.arange(total, device=device) if unique_pairs else ids[:, 0]
    return GlobalTargets(labels, own, labels[ids[:, 1]], lam)
