"""Image transforms as the official training and evaluation build them."""
from __future__ import annotations

from typing import Callable

from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode

_INTERPOLATION = {'bicubic': InterpolationMode.BICUBIC, 'bilinear': InterpolationMode.BILINEAR,
                  'nearest': InterpolationMode.NEAREST}


def build_eval_transform(config) -> Callable:
    """Resize(int(256/224 * IMG_SIZE)) -> CenterCrop(IMG_SIZE) -> ImageNet mean/std (TEST.CROP);
    else a plain resize to IMG_SIZE x IMG_SIZE. 'random' interpolation evaluates as bicubic."""
    size = config.DATA.IMG_SIZE
    interpolation = _INTERPOLATION.get(config.DATA.INTERPOLATION, InterpolationMode.BICUBIC)
    steps = []
    if size > 32:
        if config.TEST.CROP:
            steps += [transforms.Resize(int(256 / 224 * size), interpolation=interpolation),
                      transforms.CenterCrop(size)]
        else:
            steps.append(transforms.Resize((size, size), interpolation=interpolation))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(steps)


def build_train_transform(config) -> Callable:
    """timm's ImageNet training transform with the official AUG settings: RandomResizedCrop, flip,
    ColorJitter, RandAugment, RandomErasing."""
    aug = config.AUG
    transform = create_transform(
        input_size=config.DATA.IMG_SIZE,
        is_training=True,
        scale=tuple(aug.CROP_SCALE),
        color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
        auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in ('', 'none') else None,
        re_prob=aug.REPROB,
        re_mode=aug.REMODE,
        re_count=aug.RECOUNT,
        interpolation=config.DATA.INTERPOLATION,
    )
    if config.DATA.IMG_SIZE <= 32:  # as the official code: small images get a padded random crop
        # pad_if_needed: an image smaller than the crop is padded instead of failing the batch.
        transform.transforms[0] = transforms.RandomCrop(config.DATA.IMG_SIZE, padding=4, pad_if_needed=True)
    return transform
