"""Mixup / CutMix in image-text-label space (AUG.MIXUP, AUG.CUTMIX, AUG.CUTMIX_MINMAX, AUG.MIXUP_PROB,
AUG.MIXUP_SWITCH_PROB, AUG.MIXUP_MODE).

Images are mixed as timm's ``Mixup`` mixes them: lambda from Beta(alpha, alpha), CutMix instead of mixup
with probability MIXUP_SWITCH_PROB when both are on, mixing at all with probability MIXUP_PROB, per
'batch' (one draw for the batch), 'pair' (one per pair i, B-1-i, both mixed) or 'elem' (one per image),
the partner of image i being image B-1-i of the same batch (the batch flipped). A CutMix lambda is the
area left to the image after its box is clipped to the image (timm's ``correct_lam``); a box range
(CUTMIX_MINMAX) forces CutMix on, as in timm. Draws come from numpy's global RNG, as timm's, which the
training checkpoints save per rank.

Texts are not mixed. Instead of timm's dense ``[B, num_classes]`` soft targets (image-text labels are
one class per caption), each image carries its own label, its partner's position and lambda
(:class:`loss.targets.MixedTargets`); the losses turn them into the soft weights W = Y~ Y^T over the
global batch. Partners are within each process's batch (each rank mixes its own images), so every
partner's text and label is in the global batch and the rule is the same on every rank.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data.mixup import cutmix_bbox_and_lam
from torch import Tensor

from loss.targets import MixedTargets

MIXUP_MODES = ('batch', 'pair', 'elem')


def mixup_enabled(aug) -> bool:
    """Whether the AUG section mixes at all: a mixup or cutmix alpha, or a cutmix box range, and a
    non-zero MIXUP_PROB. Off, the training step and its loss are exactly those without this module."""
    return (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None) and aug.MIXUP_PROB > 0


class LabelSpaceMixup:
    """``mixup(images, labels) -> (mixed images, MixedTargets)`` for one process's batch."""

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 cutmix_minmax: Optional[Sequence[float]] = None, prob: float = 1.0, switch_prob: float = 0.5,
                 mode: str = 'batch') -> None:
        if mode not in MIXUP_MODES:
            raise ValueError(f'AUG.MIXUP_MODE {mode!r} is unknown; known: {", ".join(MIXUP_MODES)}')
        self.mixup_alpha = mixup_alpha
        # timm: a box range replaces the Beta draw of the box, so it turns CutMix on whatever its alpha.
        self.cutmix_alpha = 1.0 if cutmix_minmax is not None else cutmix_alpha
        self.cutmix_minmax = tuple(cutmix_minmax) if cutmix_minmax is not None else None
        self.prob, self.switch_prob, self.mode = prob, switch_prob, mode

    @classmethod
    def from_config(cls, config) -> Optional['LabelSpaceMixup']:
        """The mixup AUG configures, or None when it mixes nothing."""
        aug = config.AUG
        if not mixup_enabled(aug):
            return None
        return cls(aug.MIXUP, aug.CUTMIX, aug.CUTMIX_MINMAX, aug.MIXUP_PROB, aug.MIXUP_SWITCH_PROB, aug.MIXUP_MODE)

    def __call__(self, images: Tensor, labels: Tensor) -> Tuple[Tensor, MixedTargets]:
        n = images.shape[0]
        positions = np.arange(n)
        partner = positions[::-1].copy()
        # Which draw each image takes: one for all, one per (i, B-1-i) pair (the middle image of an odd
        # batch is its own partner: mixing changes neither it nor its targets), or one each.
        unit = {'batch': np.zeros(n, dtype=np.int64), 'pair': np.minimum(positions, partner),
                'elem': positions}[self.mode]
        lam, use_cutmix = self._draw(int(unit.max()) + 1 if n else 0)
        mixed = images.clone()
        for u in np.flatnonzero(lam < 1):
            members = torch.as_tensor(np.flatnonzero(unit == u), device=images.device)
            sources = torch.as_tensor(partner[unit == u], device=images.device)
            if use_cutmix[u]:
                (top, bottom, left, right), lam[u] = cutmix_bbox_and_lam(
                    images.shape, lam[u], ratio_minmax=self.cutmix_minmax, correct_lam=True)
                mixed[members, :, top:bottom, left:right] = images[sources, :, top:bottom, left:right]
            else:
                mixed[members] = images[members] * float(lam[u]) + images[sources] * float(1.0 - lam[u])
        targets = MixedTargets(labels, torch.as_tensor(partner, device=labels.device),
                               torch.as_tensor(lam[unit], dtype=torch.float64, device=labels.device))
        return mixed, targets

    def mix_batch(self, batch: Tuple[Tensor, dict, Tensor]) -> Tuple[Tensor, dict, MixedTargets]:
        """A loader batch (images, tokens, labels) with its images mixed and its labels made MixedTargets."""
        images, tokens, labels = batch
        images, targets = self(images, labels)
        return images, tokens, targets

    def _draw(self, count: int) -> Tuple[np.ndarray, np.ndarray]:
        """Lambda (1: not mixed) and whether CutMix is used, for each of ``count`` draws.

        timm's distributions, drawn in timm's order (so a seeded run mixes as timm's Mixup would): per
        batch, whether to mix first; per pair or image, the lambdas of all first, cast to float32.
        """
        both = self.mixup_alpha > 0 and self.cutmix_alpha > 0
        if self.mode == 'batch':
            if np.random.rand() >= self.prob:
                return np.ones(1), np.zeros(1, dtype=bool)
            use_cutmix = np.random.rand() < self.switch_prob if both else self.cutmix_alpha > 0
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            return np.array([np.random.beta(alpha, alpha)]), np.array([use_cutmix])
        if both:
            use_cutmix = np.random.rand(count) < self.switch_prob
            lam = np.where(use_cutmix, np.random.beta(self.cutmix_alpha, self.cutmix_alpha, size=count),
                           np.random.beta(self.mixup_alpha, self.mixup_alpha, size=count))
        else:
            use_cutmix = np.full(count, self.cutmix_alpha > 0)
            alpha = self.cutmix_alpha if self.cutmix_alpha > 0 else self.mixup_alpha
            lam = np.random.beta(alpha, alpha, size=count)
        lam = np.where(np.random.rand(count) < self.prob, lam.astype(np.float32), np.float32(1.0))
        return lam.astype(np.float64), use_cutmix
