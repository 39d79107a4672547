"""The loss family (TRAIN.LOSS) behind one registry; the trainer calls `build_loss(config)`.

Each entry also says how the model initializes its logit parameters for that loss (model/unicl.py):
the scale's initial log (used when MODEL.LOGIT_SCALE_INIT is null) and, for the sigmoid loss, the
learned bias, a model parameter only that loss has (so checkpoints of the others keep their keys).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from torch import nn

from .base import GlobalBatchLoss
from .sigmoid_loss import SigmoidLoss
from .targets import MixedTargets, cat_targets
from .unicl_loss import UniCLLoss

__all__ = ["LOSSES", "GlobalBatchLoss", "LossSpec", "MixedTargets", "SigmoidLoss", "UniCLLoss", "build_loss",
           "cat_targets", "get_loss_spec"]


@dataclass(frozen=True)
class LossSpec:
    build: Callable[[int], GlobalBatchLoss]  # tile size -> the loss module
    logit_scale_init: float  # log of the initial scale
    logit_bias_init: Optional[float] = None  # a learned logit bias starting here; None: no bias


LOSSES: Dict[str, LossSpec] = {
    # UniCL: pairs sharing a label are positives of each other. Scale 1 / 0.07 as CLIP.
    "unicl": LossSpec(lambda tile: UniCLLoss(tile), math.log(1 / 0.07)),
    # The paper's CLIP baseline: labels ignored, each pair its own class.
    "clip": LossSpec(lambda tile: UniCLLoss(tile, unique_pairs=True), math.log(1 / 0.07)),
    # SigLIP's pairwise sigmoid loss with label-aware positives; SigLIP's t = 10, b = -10.
    "sigmoid": LossSpec(lambda tile: SigmoidLoss(tile), math.log(10.0), -10.0),
}


def get_loss_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"TRAIN.LOSS {name!r} is unknown; known: {sorted(LOSSES)}")
    return LOSSES[name]


def build_loss(config) -> nn.Module:
    """The TRAIN.LOSS module, computing in TRAIN.LOSS_TILE_SIZE tiles."""
    return get_loss_spec(config.TRAIN.LOSS).build(config.TRAIN.LOSS_TILE_SIZE)
