"""Locked towers (LiT, Zhai et al. 2022): MODEL.LOCK_IMAGE / MODEL.LOCK_TEXT freeze a tower, optionally all
but its last MODEL.LOCK_*_UNLOCKED_GROUPS groups, as open_clip's --lock-image(-unlocked-groups) and
--lock-text(-unlocked-layers) do.

A tower is an ordered list of parameter groups, first to last; its projection into the joint space is the
last group, as in open_clip's own ViT and text transformer, so a fully locked tower keeps its projection
fixed too (its embedding space stays the pretrained one) and one unlocked group trains only the projection.

- image: timm's own fine groups of the encoder (`group_matcher()`: the stem, then one block each, a stage's
  downsampling with its first block, the final norm with the last block), then `image_projection`;
- text: the token and position embeddings, one block each (the final LayerNorm with the last), then
  `text_projection`.

A locked parameter has requires_grad False, so the optimizer (utils/optim.py skips them) and DDP (which
registers only parameters that require a gradient) never see it. The modules whose parameters are all
locked also stay in evaluation mode while the model trains (`UniCLModel.train`): a frozen block keeps
computing the function it was pretrained to, without dropout or drop-path. `logit_scale` is never locked.
"""
from __future__ import annotations

import logging
import re
from typing import Iterable, List, Optional, Sequence

from torch import nn
from timm.models import group_parameters

logger = logging.getLogger(__name__)

Groups = List[List[str]]  # full parameter names of the model, per group, first group first


def image_tower_groups(model: nn.Module) -> Groups:
    """The image tower's groups: timm's groups of `model.image_encoder`, then `image_projection`."""
    encoder = model.image_encoder
    by_id = group_parameters(encoder, encoder.group_matcher())
    groups = [[f'image_encoder.{name}' for name in by_id[i]] for i in sorted(by_id)]
    return groups + [['image_projection']]


_TEXT_BLOCK = re.compile(r'^resblocks\.(\d+)\.')


def text_tower_groups(model: nn.Module) -> Groups:
    """The text tower's groups: embeddings, each block (the last with `ln_final`), then `text_projection`."""
    encoder = model.text_encoder
    blocks = len(encoder.resblocks)
    groups: Groups = [[] for _ in range(blocks + 1)]
    for name, _ in encoder.named_parameters():
        block = _TEXT_BLOCK.match(name)
        if block:
            index = int(block.group(1)) + 1
        elif name.startswith('ln_final.'):
            index = blocks
        else:  # token and position embeddings, and whatever else comes before the blocks
            index = 0
        groups[index].append(f'text_encoder.{name}')
    return groups + [['text_projection']]


def lock_groups(model: nn.Module, groups: Groups, unlocked: int, key: str) -> None:
    """Freeze all of `groups` but the last `unlocked`. `key` names the config key in the error."""
    if not 0 <= unlocked < len(groups):
        raise ValueError(f'{key} {unlocked} must be in [0, {len(groups) - 1}]: the tower has {len(groups)} '
                         f'groups (the projection is the last), and unlocking all of them locks nothing')
    for names in groups[:len(groups) - unlocked]:
        for name in names:
            model.get_parameter(name).requires_grad_(False)


def frozen_modules(module: nn.Module, prefix: str = '') -> List[str]:
    """Names of the largest submodules whose parameters are all frozen (parameterless ones only as part
    of a frozen parent): what must stay in evaluation mode."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [prefix]
    names: List[str] = []
    for name, child in module.named_children():
        names += frozen_modules(child, f'{prefix}.{name}' if prefix else name)
    return names


def apply_locks(model: nn.Module, model_cfg) -> None:
    """Lock what `MODEL.LOCK_*` asks for and record the frozen modules in `model.locked_modules`."""
    if model_cfg.LOCK_IMAGE:
        lock_groups(model, image_tower_groups(model), model_cfg.LOCK_IMAGE_UNLOCKED_GROUPS,
                    'MODEL.LOCK_IMAGE_UNLOCKED_GROUPS')
    if model_cfg.LOCK_TEXT:
        lock_groups(model, text_tower_groups(model), model_cfg.LOCK_TEXT_UNLOCKED_GROUPS,
                    'MODEL.LOCK_TEXT_UNLOCKED_GROUPS')
    model.locked_modules = tuple(frozen_modules(model))
    model.train(model.training)  # the frozen modules into evaluation mode now
    if model.locked_modules:
        params = list(model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        logger.info(f'locked {len(model.locked_modules)} modules (MODEL.LOCK_*): {trainable:,} of '
                    f'{sum(p.numel() for p in params):,} parameters train')


def trainable_names(model: nn.Module) -> List[str]:
    """The parameters the optimizer holds, in model order: what a training checkpoint was saved with."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _examples(names: Iterable[str]) -> str:
    names = sorted(names)
    return ', '.join(names[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')


def check_same_trainable(saved: Optional[Sequence[str]], model: nn.Module, source: str) -> None:
    """Refuse to resume from `source` when its run trained other parameters than `model` does now.

    The optimizer state holds moments for exactly the saved run's trainable parameters, by position, so
    loading it under other locks would pair moments with the wrong tensors or fail inside torch. Checkpoints
    without the list come from before locking existed and trained every parameter."""
    now = trainable_names(model)
    before = list(saved) if saved is not None else [name for name, _ in model.named_parameters()]
    if before == now:
        return
    unlocked, locked = set(now) - set(before), set(before) - set(now)
    changes = ([f'{len(unlocked)} trainable now but not in that run ({_examples(unlocked)})'] if unlocked else []) \
        + ([f'{len(locked)} locked now but trained in that run ({_examples(locked)})'] if locked else [])
    raise ValueError(f'cannot resume from {source}: its run trained {len(before)} parameter tensors, this one '
                     f'trains {len(now)}: ' + '; '.join(changes or ['the same ones in another order'])
                     + '. MODEL.LOCK_IMAGE, MODEL.LOCK_TEXT and their *_UNLOCKED_GROUPS must be as they were; '
                     f'to go on training its weights with other locks, start a new run (another OUTPUT) with '
                     f'MODEL.PRETRAINED {source}')
