"""`DATA.DECODE_DEVICE cuda`: training JPEGs decoded in batches on the GPU, cropped, resized, flipped and
normalised there; the loader workers only read the files and make the random draws.

Per sample, a worker (`EncodedCropSampler`, then `FlipAndErasingDraws`) reads the JPEG header, draws the
RandomResizedCrop box with timm's own `get_params` (data/crop_decode.py's `CropDecoder.sample`: the same
draws as the CPU path, so the official crop distribution), then the flip (RandomHorizontalFlip's own
`torch.rand(1) < p`) and the RandomErasing patches (recorded, data/normalize.py), in the CPU path's order.
It sends the file's bytes, the box, the interpolation and the flip. The training process
(`BatchDecoder`) decodes the batch's JPEGs with one `torchvision.io.decode_jpeg(list, device=...)` call
(nvJPEG on a GPU), crops each box, resizes it with torch's antialiased interpolation (PIL's filters: the
same support and a=-0.5 cubic), rounds to uint8 as PIL does, flips, and normalises with the CPU path's
`ImageFinisher` (/255, mean/std, erased patches).

Not on this path: RandAugment and colour jitter (PIL operations per image; the config rules refuse them
with DECODE_DEVICE cuda) and the reduced-scale DCT decode (nvJPEG decodes whole images). Images that are
not baseline-readable RGB JPEGs for it (PNG, WebP, grayscale or CMYK JPEGs, and JPEGs without an end
marker, i.e. truncated ones, whose bad-data check needs a real decode) are decoded, cropped and resized on
the CPU in the worker exactly as the CPU path does at full scale, and sent as IMG_SIZE uint8 pixels; only
their flip and normalisation run on the device. A batch nvJPEG refuses is decoded image by image, a refused
image on the CPU (`decode_one`).

The same code decodes on the CPU when the batch's device is the CPU (`decode_jpeg(device='cpu')`): the
tests and the benchmark's CPU fallback run it; a training run with DECODE_DEVICE cuda refuses a CPU device
(data/build.py).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as nnf
import torchvision.transforms.functional as F
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from .crop_decode import Box, CropDecoder
from .decode import ends_in_end_of_image, load_rgb, open_image
from .normalize import BatchErasing, DeferredTail, ImageFinisher, Patch, split_tail
from .sources.base import BadSample, Record
from .transforms import TrainPipeline, build_train_transform

logger = logging.getLogger(__name__)

# torch's interpolate mode for each interpolation timm may draw; antialias where PIL filters (PIL's NEAREST
# samples pixel centres, as 'nearest-exact' does).
_MODES = {F.InterpolationMode.BICUBIC: ('bicubic', True), F.InterpolationMode.BILINEAR: ('bilinear', True),
          F.InterpolationMode.NEAREST: ('nearest-exact', False)}


@dataclass
class EncodedImage:
    """One training image as a worker sends it on this path."""
    data: torch.Tensor  # a JPEG's file bytes (uint8 [N]), or the CPU-decoded crop (uint8 [3, S, S])
    box: Box  # (top, left, height, width) in the original image
    interpolation: F.InterpolationMode
    where: str  # the record's path, for an error
    flip: bool = False

    @property
    def encoded(self) -> bool:
        return self.data.dim() == 1


@dataclass
class EncodedBatch:
    """A batch of EncodedImages, as the workers hand it to the training process."""
    images: List[EncodedImage]

    def __len__(self) -> int:
        return len(self.images)


def _device_decodable(image, data: bytes) -> bool:
    # A 3-channel JPEG ending in its EOI marker: Pillow (the CPU path) refuses a truncated JPEG when it
    # decodes; here nothing is decoded in the worker, so a file without the marker takes the CPU path and its check.
    return image.format == 'JPEG' and image.mode == 'RGB' and ends_in_end_of_image(data)


class EncodedCropSampler:
    """Worker side, record -> EncodedImage: the crop box drawn from the header as CropDecoder draws it."""

    def __init__(self, crop: RandomResizedCropAndInterpolation):
        self.sampler = CropDecoder(crop, reduce=False)
        self.size: Tuple[int, int] = tuple(crop.size)

    def __call__(self, record: Record) -> EncodedImage:
        with open_image(record) as image:
            state = random.getstate()
            box, interpolation = self.sampler.sample(image)
            if _device_decodable(image, record.image):
                data = torch.frombuffer(bytearray(record.image), dtype=torch.uint8)
                return EncodedImage(data, box, interpolation, record.where)
            try:
                pixels = load_rgb(record, image)
            except BadSample:  # as CropDecoder: a bad sample consumes no draws
                random.setstate(state)
                raise
        crop = F.resized_crop(pixels, *box, list(self.size), interpolation)  # the CPU path's own call
        return EncodedImage(F.pil_to_tensor(crop), box, interpolation, record.where)


class FlipAndErasingDraws:
    """Worker side, EncodedImage -> (the image with its flip drawn, the erased patches drawn): the draws of
    RandomHorizontalFlip and RandomErasing, in the CPU path's order, without the pixels."""

    def __init__(self, flip_probability: float, tail: DeferredTail, size: Tuple[int, int]):
        self.flip_probability, self.tail, self.size = flip_probability, tail, size

    def __call__(self, image: EncodedImage) -> Tuple[EncodedImage, List[Patch]]:
        flip = bool(torch.rand(1) < self.flip_probability)  # torchvision's RandomHorizontalFlip draw
        return replace(image, flip=flip), self.tail.record_erasing(3, *self.size)


def stack_encoded(outputs: Sequence[Tuple[EncodedImage, List[Patch]]],
                  shared: bool = True) -> Tuple[EncodedBatch, BatchErasing]:
    """The workers' batch: the EncodedImages and their erased patches (`shared` as stack_images takes it)."""
    return EncodedBatch([image for image, _ in outputs]), BatchErasing.of([patches for _, patches in outputs], shared)


def decode_one(image: EncodedImage, device: torch.device) -> torch.Tensor:
    """One JPEG decoded on `device`, else on the CPU and copied there: nvJPEG refuses some files libjpeg-turbo
    reads (some progressive ones, as DALI's users reported). One that neither decodes stops the run."""
    error: Optional[RuntimeError] = None
    for where in dict.fromkeys([device, torch.device('cpu')]):
        try:
            return decode_jpeg(image.data, mode=ImageReadMode.RGB, device=where).to(device)
        except RuntimeError as exc:
            error = exc
    raise RuntimeError(f'cannot decode {image.where} (its header and end marker were read): {error}') from error


def resized_crop(pixels: torch.Tensor, box: Box, size: Tuple[int, int],
                 interpolation: F.InterpolationMode) -> torch.Tensor:
    """uint8 [3, H, W] -> the box resized to `size`, uint8 (rounded and clamped, as PIL's resize writes)."""
    top, left, height, width = box
    region = pixels[None, :, top:top + height, left:left + width].to(torch.float32)
    mode, antialias = _MODES[interpolation]
    resized = nnf.interpolate(region, size=size, mode=mode, antialias=antialias,
                              **({} if mode.startswith('nearest') else {'align_corners': False}))
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


class BatchDecoder:
    """Training-process side (the loader's finish): EncodedBatch -> normalised float32 [B, 3, S, S] on
    `device`, its JPEGs decoded there in one decode_jpeg call."""

    def __init__(self, size: Tuple[int, int], finisher: ImageFinisher):
        self.size, self.finisher = size, finisher

    def decode(self, images: List[EncodedImage], device: torch.device) -> List[torch.Tensor]:
        try:
            return decode_jpeg([image.data for image in images], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:  # the batch call returns nothing when one image fails: find it
            logger.warning(f'decode_jpeg on {device} failed for a batch ({exc}); decoding it image by image')
            return [decode_one(image, device) for image in images]

    def __call__(self, batch: EncodedBatch, erasing: BatchErasing,
                 device: Optional[torch.device] = None) -> torch.Tensor:
        device = torch.device(device) if device is not None else torch.device('cpu')
        pixels = torch.empty((len(batch), 3, *self.size), dtype=torch.uint8, device=device)
        encoded = [i for i, image in enumerate(batch.images) if image.encoded]
        decoded = self.decode([batch.images[i] for i in encoded], device) if encoded else []
        for i, full in zip(encoded, decoded):
            image = batch.images[i]
            pixels[i] = resized_crop(full, image.box, self.size, image.interpolation)
        for i, image in enumerate(batch.images):
            if not image.encoded:
                pixels[i] = image.data.to(device, non_blocking=True)
        flipped = [i for i, image in enumerate(batch.images) if image.flip]
        if flipped:
            index = torch.tensor(flipped, device=device)
            pixels[index] = pixels[index].flip(-1)
        return self.finisher(pixels, erasing, device)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(size={self.size}, {self.finisher!r})'


def build_batched_decode_pipeline(config):
    """The TrainPipeline of DATA.DECODE_DEVICE cuda (decoding on whatever device the loader's batches go
    to). Refuses transforms this path cannot run, naming the keys (configs/validation.py refuses them first)."""
    steps = list(build_train_transform(config).transforms)
    crop = steps.pop(0)
    if not isinstance(crop, RandomResizedCropAndInterpolation):
        raise ValueError(f'DATA.DECODE_DEVICE cuda needs the RandomResizedCrop of DATA.IMG_SIZE > 32, '
                         f'not {type(crop).__name__}')
    flip = steps.pop(0) if steps and isinstance(steps[0], transforms.RandomHorizontalFlip) else None
    split = split_tail(steps)
    if split is None or split[0]:
        raise ValueError(f'DATA.DECODE_DEVICE cuda runs the crop, flip, normalisation and erasing only; the '
                         f'transform also has {split[0] if split else steps} (AUG.AUTO_AUGMENT / AUG.COLOR_JITTER)')
    _, tail, finisher = split
    size = tuple(crop.size)
    return TrainPipeline(EncodedCropSampler(crop), FlipAndErasingDraws(flip.p if flip else 0.0, tail, size),
                         BatchDecoder(size, finisher), stack=stack_encoded)
