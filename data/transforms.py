"""Image transforms as the official training and evaluation build them."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import functional as F
from torchvision.transforms import InterpolationMode

from . import jpeg_region
from .crop_decode import CropDecoder
from .decode import decode_image
from .normalize import split_tail, stack_images
from .sources.base import Record

_INTERPOLATION = {'bicubic': InterpolationMode.BICUBIC, 'bilinear': InterpolationMode.BILINEAR,
                  'nearest': InterpolationMode.NEAREST}


def _official_validation(config, size: int, interpolation: InterpolationMode) -> List[Callable]:
    # The UniCL/ImageNet validation transform, the one training validates with; TEST.CROP false and
    # CIFAR-sized images keep the official code's behaviour.
    if size <= 32:
        return []
    if config.TEST.CROP:
        return [transforms.Resize(int(256 / 224 * size), interpolation=interpolation), transforms.CenterCrop(size)]
    return [transforms.Resize((size, size), interpolation=interpolation)]


def _shorter_side_crop(config, size: int, interpolation: InterpolationMode) -> List[Callable]:
    # ELEVATER with CENTER_CROP: no 256/224 margin, so more of the image survives the crop.
    return [transforms.Resize(size, interpolation=interpolation), transforms.CenterCrop(size)]


def _squash(config, size: int, interpolation: InterpolationMode) -> List[Callable]:
    # ELEVATER without CENTER_CROP (kitti-distance): the whole frame, aspect ratio not kept.
    return [transforms.Resize((size, size), interpolation=interpolation)]


class NativeResizeCrop:
    """torchvision's Resize [-> CenterCrop] of an RGB image, computed by data/resample.c (data/jpeg_region.py):
    only the pixels CenterCrop keeps are computed, each the one Pillow's whole resize has there, so the same
    image. What it does not do (other modes and filters, max_size, a crop larger than the resized image,
    which torchvision pads) goes through the torchvision steps themselves."""

    def __init__(self, resize: transforms.Resize, crop: Optional[transforms.CenterCrop] = None):
        self.resize, self.crop = resize, crop

    def _output_size(self, width: int, height: int) -> Optional[Tuple[int, int]]:
        # torchvision's rule: (h, w) as given, or the shorter side to `size` and the longer in proportion.
        size = self.resize.size
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return size[1], size[0]
        if self.resize.max_size is not None:
            return None
        short = size if isinstance(size, int) else size[0]
        if width <= height:
            return short, int(short * height / width)
        return int(short * width / height), short

    def __call__(self, image: Image.Image) -> Image.Image:
        resample = F.pil_modes_mapping[self.resize.interpolation]
        size = self._output_size(*image.size) if image.mode == 'RGB' else None
        if size is not None and resample in jpeg_region.C_FILTERS:
            window = (0, 0, *size)
            if self.crop is not None:
                crop_h, crop_w = self.crop.size
                # CenterCrop's offsets, Python's round included
                left, top = int(round((size[0] - crop_w) / 2.0)), int(round((size[1] - crop_h) / 2.0))
                window = (left, top, crop_w, crop_h)
            if window[0] >= 0 and window[1] >= 0:
                resized = jpeg_region.resize(jpeg_region.RawRGB.of(image), size, resample, (0, 0, *image.size),
                                             window)
                if resized is not None:
                    return resized
        image = self.resize(image)
        return self.crop(image) if self.crop is not None else image

    def __repr__(self) -> str:
        # As the steps it stands for print inside a Compose: the same pixels, so the same evaluation feature
        # cache key (evaluation/cache.py) with or without the helper.
        return f'{self.resize!r}' + (f'\n    {self.crop!r}' if self.crop is not None else '')


def native_geometry(steps: List[Callable]) -> List[Callable]:
    """An evaluation transform's leading Resize [-> CenterCrop] as one NativeResizeCrop where the C helper
    is built; the steps unchanged otherwise."""
    if not steps or not isinstance(steps[0], transforms.Resize) or not jpeg_region.available():
        return steps
    if len(steps) > 1 and isinstance(steps[1], transforms.CenterCrop):
        return [NativeResizeCrop(steps[0], steps[1])] + steps[2:]
    return [NativeResizeCrop(steps[0])] + steps[1:]


# Geometry of an evaluation transform by name; each maps (config, size, interpolation) to the steps before
# ToTensor + Normalize.
EVAL_TRANSFORMS: Dict[str, Callable[..., List[Callable]]] = {
    'resize': _official_validation,
    'crop': _shorter_side_crop,
    'squash': _squash,
}
DEFAULT_EVAL_TRANSFORM = 'resize'


def build_eval_transform(config, mode: Optional[str] = None, native: bool = True) -> Callable:
    """The evaluation transform `mode` at DATA.IMG_SIZE, then ImageNet mean/std:
    'resize' (the default, also for None): Resize(int(256/224 * IMG_SIZE)) -> CenterCrop(IMG_SIZE) as the
    official validation (with TEST.CROP false a plain resize to IMG_SIZE x IMG_SIZE; images of 32 pixels or
    less are not resized); 'crop': Resize(IMG_SIZE) of the shorter side -> CenterCrop(IMG_SIZE), ELEVATER's;
    'squash': Resize((IMG_SIZE, IMG_SIZE)), ELEVATER's without center crop.
    DATA.INTERPOLATION 'random' evaluates as bicubic. `native`: the resize and crop computed by the C helper
    where it is built (NativeResizeCrop, the same pixels); False: torchvision's steps."""
    mode = DEFAULT_EVAL_TRANSFORM if mode is None else mode
    if mode not in EVAL_TRANSFORMS:
        raise ValueError(f'unknown eval transform {mode!r}; known: {sorted(EVAL_TRANSFORMS)}')
    size = config.DATA.IMG_SIZE
    interpolation = _INTERPOLATION.get(config.DATA.INTERPOLATION, InterpolationMode.BICUBIC)
    steps = EVAL_TRANSFORMS[mode](config, size, interpolation)
    if native:
        steps = native_geometry(steps)
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


@dataclass
class TrainPipeline:
    """The official training transform as the loader applies it, in three places:
    decode (worker): record -> PIL image the transform starts from; transform (worker): that image ->
    a float tensor or, with a DeferredTail last, (uint8 tensor, erased patches); finish (the training
    process right after the copy to a GPU, or the workers for a CPU device): the stacked batch ->
    normalised float32 on the device."""
    decode: Callable[[Record], Any]  # a PIL image; data/gpu_decode.py's EncodedImage for DECODE_DEVICE cuda
    transform: Callable
    finish: Optional[Callable]  # None: the transform ends in float tensors, finished in the workers
    stack: Callable = stack_images  # the transform's outputs -> (batch, erasing), in the workers


def affine_ops_in_c(step: Callable) -> Callable:
    """timm's RandAugment / AutoAugment with their rotate, shear and translate ops ending in data/affine.c
    (data/jpeg_region.py's CAffineImage): the same draws and pixels, the affine resampling ~3x faster. Other
    steps unchanged."""
    operations = list(getattr(step, 'ops', []))  # RandAugment
    operations += [op for sub_policy in getattr(step, 'policy', []) for op in sub_policy]  # AutoAugment
    for op in operations:
        already = isinstance(op.aug_fn, partial) and op.aug_fn.func is jpeg_region.with_c_affine
        if isinstance(op, AugmentOp) and not already:
            op.aug_fn = partial(jpeg_region.with_c_affine, op.aug_fn)
    return step


def build_train_pipeline(config) -> TrainPipeline:
    """The official training transform split for the loader.

    With a RandomResizedCrop first, `decode` is a CropDecoder (data/crop_decode.py: the crop's box from the
    header size, only its rectangle decoded where data/jpeg_region.py's helper is built, at the smallest DCT
    scale that keeps the box >= IMG_SIZE with DATA.REDUCED_DECODE, crop + resize) and the transform goes on
    from the flip; else `decode` is `decode_image` and the transform is whole. Its ToTensor -> Normalize -> RandomErasing end becomes
    a DeferredTail in the workers and an ImageFinisher on the device (data/normalize.py: bit-identical on
    the CPU, and a quarter of the bytes to move)."""
    steps = list(build_train_transform(config).transforms)
    if jpeg_region.available():
        steps = [affine_ops_in_c(step) for step in steps]
    decode: Callable[[Record], Image.Image] = decode_image
    if isinstance(steps[0], RandomResizedCropAndInterpolation):
        decode = CropDecoder(steps.pop(0), reduce=config.DATA.REDUCED_DECODE)
    split = split_tail(steps)
    if split is None:
        return TrainPipeline(decode, transforms.Compose(steps), None)
    head, tail, finish = split
    return TrainPipeline(decode, transforms.Compose(head + [tail]), finish)
