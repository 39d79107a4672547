"""Decode only what the training crop needs.

timm's RandomResizedCrop decodes the whole image, then keeps a random box of 8-100% of its area and
resizes it to IMG_SIZE. The box depends on nothing but the image's size and the random draws, so
`CropDecoder` draws it from the size in the header (with timm's own `get_params`, so the same draws give
the same box) and then decodes a JPEG at the smallest DCT scale (1/2, 1/4, 1/8: libjpeg's scaled
decoding, through Pillow's `Image.draft`) at which the box still has at least IMG_SIZE pixels each way.
The box is mapped into the reduced image's coordinates (pixel k of a 1/s decode covers original pixels
[k*s, (k+1)*s)) and resized from there with the same filter, sub-pixel exact.

Where the optional C helper is built (data/jpeg_region.py), only the box's rectangle of the (reduced) image
is decoded, with the pixels a whole decode has there, and resized by data/resample.c, with the pixels
Pillow's resize gives; elsewhere Pillow decodes it all and resizes.

At scale 1 (no box big enough to reduce, or not a JPEG) the pixels are exactly timm's: the same decode
and the same crop-then-resize (Pillow's resize of the box's pixels, or the C resize that equals it). At
1/2-1/8 the decode's own low-pass replaces part of the resize filter's; tests/test_crop_decode.py bounds
the difference. The random draws are the same in number and order as
with the whole transform, so every later augmentation of the sample draws what it drew before.
"""
from __future__ import annotations

import math
import random
from typing import NamedTuple, Tuple, Union

import torchvision.transforms.functional as F
from PIL import Image, JpegImagePlugin
from timm.data.transforms import RandomResizedCropAndInterpolation

from .decode import load_rgb, open_image
from . import jpeg_region
from .sources.base import BadSample, Record

# The DCT scales libjpeg decodes at by Pillow's draft, largest reduction first.
DCT_SCALES = (8, 4, 2, 1)

Box = Tuple[int, int, int, int]  # (top, left, height, width), as timm's get_params returns it


class DecodedCrop(NamedTuple):
    # The 1/scale decode, or the part of it that starts at `origin` (raw: the helper's decode of exactly the
    # whole pixels the box touches, enclosing_pixels)
    pixels: Union[Image.Image, jpeg_region.RawRGB]
    origin: Tuple[int, int]  # (x, y) of pixels' first pixel in the 1/scale image
    box: Box  # in the original image's coordinates
    scale: int
    interpolation: F.InterpolationMode


def dct_scale(box_w: float, box_h: float, out_w: int, out_h: int) -> int:
    """The largest DCT reduction s at which a box_w x box_h box still covers out_w x out_h pixels."""
    room = min(box_w / out_w, box_h / out_h)
    return next(s for s in DCT_SCALES if s <= room or s == 1)


def draft_at(image: Image.Image, scale: int) -> int:
    """Ask a lazily opened JPEG for a 1/scale decode; returns the scale it will actually decode at.

    Pillow's draft picks the largest s in 8, 4, 2, 1 with s <= min(W // w, H // h) for a requested w x h;
    requesting (W // scale, H // scale) gives exactly `scale` (W // (W // s) lies in [s, 2s)), and the
    returned box says which scale was taken, so a changed rule cannot map the crop wrong."""
    if scale == 1 or not isinstance(image, JpegImagePlugin.JpegImageFile):
        return 1
    width, height = image.size
    drafted = image.draft('RGB', (width // scale, height // scale))
    if drafted is None:  # Pillow declined (already configured, or more than one tile)
        return 1
    return int(round(width / drafted[1][2]))


def enclosing_pixels(box: Box, scale: int, image_size: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """(left, top, right, bottom) of the whole pixels of the 1/scale decode that `box` touches; libjpeg's
    1/scale image is ceil(W / scale) x ceil(H / scale)."""
    top, left, height, width = box
    scaled_w, scaled_h = (-(-image_size[0] // scale), -(-image_size[1] // scale))
    return (left // scale, top // scale, min(-(-(left + width) // scale), scaled_w),
            min(-(-(top + height) // scale), scaled_h))


def resized_box(decoded: DecodedCrop, size: Tuple[int, int], native: bool = True) -> Image.Image:
    """The crop box of a decode, resized to `size` (height, width): timm's crop-then-resize, which at scale 1
    is Pillow's resize of exactly the box's pixels; computed by data/resample.c where the helper is built and
    `native` (the same pixels), else by Pillow."""
    top, left, height, width = decoded.box
    x, y, scale = *decoded.origin, decoded.scale
    pixels = decoded.pixels
    # At 1/scale, cut the enclosing whole pixels first: like timm's crop-then-resize, the filter then sees
    # (almost) only pixels of the box; resize's float box places the sampling grid on the box's exact edges.
    x0, y0, x1, y1 = left / scale - x, top / scale - y, (left + width) / scale - x, (top + height) / scale - y
    cut = (math.floor(x0), math.floor(y0), min(math.ceil(x1), pixels.width), min(math.ceil(y1), pixels.height))
    box = (x0 - cut[0], y0 - cut[1], x1 - cut[0], y1 - cut[1])
    resample, out = F.pil_modes_mapping[decoded.interpolation], (size[1], size[0])
    if isinstance(pixels, jpeg_region.RawRGB):
        assert cut == (0, 0, pixels.width, pixels.height), (cut, pixels.width, pixels.height)
    else:
        pixels = pixels.crop(cut)
        if native and jpeg_region.available() and pixels.mode == 'RGB':
            pixels = jpeg_region.RawRGB.of(pixels)
    if isinstance(pixels, jpeg_region.RawRGB):
        resized = jpeg_region.resize(pixels, out, resample, box)
        if resized is not None:
            return resized
        pixels = pixels.image()
    return pixels.resize(out, resample, box=box)


class CropDecoder:
    """record -> timm's RandomResizedCropAndInterpolation of its image, decoded at the reduced scale the
    crop allows (`reduce=False`: always at full scale, then exactly timm's output), only the box's
    rectangle where data/jpeg_region.py's helper is built, resized by it (`native=False`: Pillow's whole decode
    and resize).

    Bad data raises BadSample as `decode_image` does; a sample whose pixels fail to decode after its box
    was drawn gives the random draws back, so a bad sample consumes none, as before."""

    def __init__(self, crop: RandomResizedCropAndInterpolation, reduce: bool = True, native: bool = True):
        self.crop, self.reduce, self.native = crop, reduce, native

    def sample(self, image: Image.Image) -> Tuple[Box, F.InterpolationMode]:
        """timm's draws, in timm's order: the box from the (header) size, then the interpolation."""
        box = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        return box, interpolation

    def decode(self, record: Record) -> DecodedCrop:
        """The pixels the crop needs: the box's rectangle where the JPEG helper is built, else the whole
        image, decoded at the reduced scale the box allows."""
        with open_image(record) as image:
            state = random.getstate()
            box, interpolation = self.sample(image)  # needs only the size: the pixels are not decoded yet
            scale = 1
            if self.reduce:
                out_h, out_w = self.crop.size
                scale = dct_scale(box[3], box[2], out_w, out_h)
            if self.native and image.format == 'JPEG':
                left, top, right, bottom = enclosing_pixels(box, scale, image.size)
                pixels = jpeg_region.decode_raw_region(record.image, scale, left, top, right - left, bottom - top)
                if pixels is not None:
                    return DecodedCrop(pixels, (left, top), box, scale, interpolation)
            scale = draft_at(image, scale)
            try:
                pixels = load_rgb(record, image)
            except BadSample:
                random.setstate(state)
                raise
        return DecodedCrop(pixels, (0, 0), box, scale, interpolation)

    def __call__(self, record: Record) -> Image.Image:
        return resized_box(self.decode(record), self.crop.size, self.native)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.crop!r}, reduce={self.reduce}, native={self.native})'
