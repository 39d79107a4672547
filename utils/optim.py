"""Optimizer and learning-rate schedule, as the official recipe sets them up."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaledLR:
    base: float
    warmup: float
    minimum: float


def scaled_learning_rates(config, world_size: int) -> ScaledLR:
    """TRAIN.{BASE,WARMUP,MIN}_LR are set for a global batch of 512 and scaled linearly to the real one
    (per-process batch x processes x accumulation steps), as the official code does."""
    factor = config.DATA.BATCH_SIZE * world_size * max(config.TRAIN.ACCUMULATION_STEPS, 1) / 512.0
    return ScaledLR(config.TRAIN.BASE_LR * factor, config.TRAIN.WARMUP_LR * factor, config.TRAIN.MIN_LR * factor)


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups: decayed weights, and the rest — norms, biases and every 1-d or scalar parameter
    (`logit_scale`), plus what the model names in `no_weight_decay()` (embeddings, position tables)."""
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith('.bias') or name in skip else decay).append(param)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def build_optimizer(config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    opt = config.TRAIN.OPTIMIZER
    groups = parameter_groups(model, config.TRAIN.WEIGHT_DECAY)
    if opt.NAME == 'adamw':
        return _fused_if_possible(torch.optim.AdamW, groups, opt.FUSED, lr=lr, betas=tuple(opt.BETAS), eps=opt.EPS)
    if opt.NAME == 'sgd':
        return _fused_if_possible(torch.optim.SGD, groups, opt.FUSED, lr=lr, momentum=opt.MOMENTUM, nesterov=True)
    raise ValueError(f'TRAIN.OPTIMIZER.NAME {opt.NAME!r} is unknown; known: adamw, sgd')


def _fused_if_possible(optimizer: type, groups: List[Dict], fused: bool, **options) -> torch.optim.Optimizer:
    """`optimizer(..., fused=True)` when asked and torch has the kernel for these parameters (CPU from torch 2.4,
    CUDA, ...); torch refuses unsupported devices and dtypes when the optimizer is built."""
    if fused:
        try:
            return optimizer(groups, fused=True, **options)
        except (RuntimeError, TypeError, ValueError) as refusal:
            logger.info(f'TRAIN.OPTIMIZER.FUSED: torch has no fused {optimizer.__name__} here ({refusal}); '
                        'using its per-parameter loop')
    return optimizer(groups, **options)


def build_scheduler(config, optimizer: torch.optim.Optimizer, steps_per_epoch: int, lrs: ScaledLR) -> Scheduler:
    """timm's scheduler stepped per optimizer step (`step_update(step)`): warmup then cosine (or step) decay."""
    total = int(config.TRAIN.EPOCHS * steps_per_epoch)
    warmup = int(config.TRAIN.WARMUP_EPOCHS * steps_per_epoch)
    sched = config.TRAIN.LR_SCHEDULER
    if sched.NAME == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=total, lr_min=lrs.minimum, warmup_lr_init=lrs.warmup,
                                 warmup_t=warmup, cycle_limit=1, t_in_epochs=False)
    if sched.NAME == 'step':
        return StepLRScheduler(optimizer, decay_t=int(sched.DECAY_EPOCHS * steps_per_epoch),
                               decay_rate=sched.DECAY_RATE, warmup_lr_init=lrs.warmup, warmup_t=warmup,
                               t_in_epochs=False)
    raise ValueError(f'TRAIN.LR_SCHEDULER.NAME {sched.NAME!r} is unknown; known: cosine, step')
