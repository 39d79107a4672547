"""Training and evaluation transforms: the official ones by default, each AUG key honoured."""
from __future__ import annotations

import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from data.transforms import build_eval_transform, build_train_transform
from tests.conftest import tiny_config


def _steps(transform):
    return {type(step): step for step in transform.transforms}


def test_official_training_transform():
    transform = build_train_transform(tiny_config())
    crop, steps = transform.transforms[0], _steps(transform)
    assert crop.size == (64, 64) and crop.scale == (0.08, 1.0) and 'bicubic' in str(crop.interpolation).lower()
    assert RandAugment in steps and steps[RandomErasing].probability == 0.25
    # timm applies ColorJitter only without RandAugment, as in the official runs.
    assert transforms.ColorJitter not in steps
    jitter = _steps(build_train_transform(tiny_config('AUG.AUTO_AUGMENT', 'none')))[transforms.ColorJitter]
    assert jitter.brightness == (0.6, 1.4)  # COLOR_JITTER 0.4


def test_aug_keys_turn_parts_off_and_set_the_crop_scale():
    config = tiny_config('AUG.COLOR_JITTER', '0.0', 'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0',
                         'AUG.CROP_SCALE', '[0.5, 1.0]')
    transform = build_train_transform(config)
    steps = _steps(transform)
    assert transform.transforms[0].scale == (0.5, 1.0)
    assert not {transforms.ColorJitter, RandAugment, RandomErasing} & set(steps)
    image = Image.new('RGB', (80, 70), (200, 30, 30))
    out = build_train_transform(config)(image)
    assert out.shape == (3, 64, 64)
    # Without colour augmentations a flat red image stays flat red after normalization.
    assert torch.allclose(out, out[:, :1, :1].expand_as(out), atol=1e-5)


def test_small_images_get_a_padded_random_crop():
    config = tiny_config('DATA.IMG_SIZE', '32', 'MODEL.IMAGE_ENCODER.IMG_SIZE', '32')
    transform = build_train_transform(config)
    assert isinstance(transform.transforms[0], transforms.RandomCrop)
    assert transform(Image.new('RGB', (20, 20))).shape == (3, 32, 32)  # smaller than the crop: padded


def test_eval_transform_resizes_then_center_crops():
    steps = build_eval_transform(tiny_config(), native=False).transforms  # the declared geometry, torchvision's
    assert isinstance(steps[0], transforms.Resize) and steps[0].size == int(256 / 224 * 64)
    assert isinstance(steps[1], transforms.CenterCrop) and steps[1].size == (64, 64)
    plain = build_eval_transform(tiny_config('TEST.CROP', 'False'), native=False).transforms[0]
    assert plain.size == (64, 64)
