"""Mixup / CutMix in image-text-label space (data/mixup.py): images mixed exactly as timm's Mixup mixes them,
targets that are timm's soft targets (Y~ = lam Y + (1 - lam) Y_flipped, the issue #12 formula's mixed side),
any batch size, and the AUG keys that turn it on or leave it off."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import Mixup

from configs import CONFIG_DIR, load_config
from data.mixup import LabelSpaceMixup
from loss import MixedTargets

LABELS = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5])


def mixed_rows(targets: MixedTargets, classes: int) -> torch.Tensor:
    """Y~: each image's own one-hot label weighted lam, its partner's weighted 1 - lam."""
    y = F.one_hot(targets.labels, classes).double()
    lam = targets.lam[:, None]
    return lam * y + (1 - lam) * y[targets.partner]


@pytest.mark.parametrize('minmax', [None, (0.2, 0.8)], ids=['alpha', 'box-range'])
@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_images_and_targets_are_timms(mode: str, minmax) -> None:
    for seed in range(4):
        images = torch.randn(len(LABELS), 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        timm_mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=minmax, prob=0.8, switch_prob=0.5,
                           mode=mode, label_smoothing=0.0, num_classes=6)
        np.random.seed(seed)
        timm_images, timm_targets = timm_mixup(images.clone(), LABELS)
        np.random.seed(seed)
        ours, targets = LabelSpaceMixup(0.8, 1.0, minmax, 0.8, 0.5, mode)(images, LABELS)
        assert torch.equal(ours, timm_images), (mode, seed)
        assert torch.equal(targets.partner, torch.arange(len(LABELS) - 1, -1, -1))
        # timm keeps lambda in float32; ours is the float64 value.
        torch.testing.assert_close(mixed_rows(targets, 6), timm_targets.double(), rtol=0, atol=1e-7)


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_each_image_holds_lambda_of_itself_and_the_rest_of_its_partner(mode: str) -> None:
    # Odd batch: the middle image is its own partner. Image k is the constant k + 1, so a pixel tells which
    # image it came from (CutMix) or in which proportion (mixup).
    n = 7
    images = torch.arange(1.0, n + 1).reshape(n, 1, 1, 1).expand(n, 3, 20, 20).contiguous()
    np.random.seed(1)
    mixer = LabelSpaceMixup(0.8, 1.0, None, 1.0, 0.5, mode)
    mixed_seen = 0
    for _ in range(6):
        mixed, targets = mixer(images, torch.arange(n))
        for i, j in enumerate(targets.partner.tolist()):
            own, other = images[i, 0, 0, 0].item(), images[j, 0, 0, 0].item()
            pixels = mixed[i].double()
            if i == j:
                assert torch.equal(mixed[i], images[i])
                continue
            is_cutmix = bool(((pixels == own) | (pixels == other)).all()) and targets.lam[i] < 1
            share = (pixels == own).double().mean() if is_cutmix else ((pixels - other) / (own - other)).mean()
            assert share.item() == pytest.approx(targets.lam[i].item(), abs=1e-6), (mode, i)
            mixed_seen += targets.lam[i].item() < 1
    assert mixed_seen > 0
    if mode == 'pair':  # both images of a pair take the same draw
        assert torch.equal(targets.lam, targets.lam.flip(0))


def test_aug_keys_turn_it_on_and_the_released_configs_leave_it_off() -> None:
    for name in sorted(glob.glob(os.path.join(CONFIG_DIR, '*.yaml'))):
        config = load_config(name)
        assert LabelSpaceMixup.from_config(config) is None, name
        assert config.TRAIN.LOSS == 'unicl', name
    on = ['MODEL.LABEL_SMOOTHING', '0.0']
    assert LabelSpaceMixup.from_config(load_config(None, ['AUG.MIXUP', '0.8', 'AUG.MIXUP_PROB', '0.0'])) is None
    mixer = LabelSpaceMixup.from_config(load_config(None, on + ['AUG.CUTMIX_MINMAX', '[0.2, 0.8]']))
    assert mixer.cutmix_alpha == 1.0 and mixer.mixup_alpha == 0.0  # a box range forces CutMix on, as timm
    mixer = LabelSpaceMixup.from_config(load_config(None, on + ['AUG.MIXUP', '0.4', 'AUG.MIXUP_MODE', 'pair',
                                                                'AUG.MIXUP_PROB', '0.5', 'AUG.MIXUP_SWITCH_PROB', '0.2']))
    assert (mixer.mixup_alpha, mixer.cutmix_alpha, mixer.prob, mixer.switch_prob, mixer.mode) == (0.4, 0.0, 0.5, 0.2,
                                                                                                    'pair')
    with pytest.raises(ValueError, match='AUG.MIXUP_MODE'):
        LabelSpaceMixup(mode='row')
